"""Serving a local model (a GGUF file or a Hugging Face directory) that has no catalogue entry.

What the file says wins: the served name (GGUF `general.name`, else the file or directory name, made a valid
model id), the context length (GGUF `<arch>.context_length`, HF `max_position_embeddings`) and the chat
template (GGUF `tokenizer.chat_template`, HF `chat_template.jinja`/tokenizer_config.json; the engine reads it
from the converted tokenizer). The catalogue is only consulted for prices and options: an entry of the same
name lends them; otherwise the model gets the defaults, and the log says so. The result is a derived catalogue
(base + one entry per local model) written to the state directory, so replicas read the same file.
"""

import hashlib
import json
import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)

MAX_MODEL_ID = 64
_NOT_ID = re.compile(r"[^a-z0-9._-]+")


@dataclass(frozen=True, slots=True)
class LocalModel:
    """What a local model file or directory says about itself."""

    name: str  # a valid model id
    kind: str  # "gguf" or "hf_dir"
    path: Path
    architecture: str
    context_length: int | None
    has_chat_template: bool
    dtype: str | None = None  # an HF checkpoint's own dtype (float32/bfloat16); None: the default
    options_from_catalogue: bool = False  # a catalogue entry of the same name lent price and options


def model_id(raw: str) -> str:
    """`raw` as a model id clients can send: lowercase [a-z0-9._-], runs of anything else as one '-'
    (no ':' or '/': stage actor names and routes split on them), at most 64 characters."""
    text = _NOT_ID.sub("-", raw.strip().lower()).strip("-._")[:MAX_MODEL_ID].rstrip("-._")
    if not text:
        raise ValueError(f"cannot make a model id from {raw!r}")
    return text


def read_local_model(path: Path) -> LocalModel:
    """Name, architecture, context length and chat template of a .gguf file or an HF checkpoint directory."""
    path = path.expanduser().resolve()
    if path.is_dir():
        return _read_hf_dir(path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _read_gguf(path)
    raise FileNotFoundError(f"{path} is neither a .gguf file nor a Hugging Face checkpoint directory")


def _read_gguf(path: Path) -> LocalModel:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except (ValueError, OSError) as exc:
        raise ValueError(f"{path} is not a readable GGUF file: {exc}") from exc

    def field(key: str) -> Any:
        found = reader.fields.get(key)
        return found.contents() if found is not None else None

    architecture = str(field("general.architecture") or "")
    context = field(f"{architecture}.context_length") if architecture else None
    name = field("general.name") or path.stem
    return LocalModel(
        name=model_id(str(name)),
        kind="gguf",
        path=path,
        architecture=architecture or "unknown",
        context_length=int(context) if context else None,
        has_chat_template=bool(field("tokenizer.chat_template")),
    )


def _read_hf_dir(path: Path) -> LocalModel:
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{path} is not a Hugging Face checkpoint (no config.json)")
    config = json.loads(config_file.read_text())
    dtype = config.get("dtype") or config.get("torch_dtype")
    tokenizer_config = path / "tokenizer_config.json"
    template = (path / "chat_template.jinja").exists() or (path / "chat_template.json").exists()
    if not template and tokenizer_config.exists():
        template = bool(json.loads(tokenizer_config.read_text()).get("chat_template"))
    context = config.get("max_position_embeddings")
    return LocalModel(
        name=model_id(path.name),
        kind="hf_dir",
        path=path,
        architecture=str(config.get("model_type") or "unknown"),
        context_length=int(context) if context else None,
        has_chat_template=template,
        dtype=dtype if dtype in ("float32", "bfloat16") else None,
    )


def local_entry(model: LocalModel, catalogue_entry: dict[str, Any] | None) -> dict[str, Any]:
    """The catalogue entry serving `model`: the file's source and context; prices and options from
    `catalogue_entry` (an entry of the same name) when there is one, else the defaults."""
    entry: dict[str, Any] = dict(catalogue_entry or {})
    entry["source"] = {"kind": model.kind, "path": str(model.path)}
    entry.setdefault("backend", "transformers")
    if model.dtype is not None and catalogue_entry is None:
        entry["dtype"] = model.dtype
    if model.context_length is not None:
        entry["max_model_len"] = min(model.context_length, entry.get("max_model_len") or model.context_length)
    entry.setdefault("owned_by", "local")
    return entry


def catalogue_with_local(base: Path, paths: list[Path], state_dir: Path) -> tuple[Path, list[LocalModel]]:
    """Write a catalogue = `base` + one entry per local model in `paths`; return its path and the models."""
    raw = yaml.safe_load(base.read_text()) or {}
    models = raw.setdefault("models", {})
    found = []
    for path in paths:
        model = read_local_model(path)
        known = models.get(model.name)
        if isinstance(known, dict) and known.get("backend", "transformers") != "transformers":
            known = None  # a llama.cpp/vLLM/proxy entry's options do not apply to the sharded engine
        models[model.name] = local_entry(model, known)
        model = replace(model, options_from_catalogue=known is not None)
        logger.info("%s", describe_local(model))
        found.append(model)
    digest = hashlib.sha256("\0".join(str(m.path) for m in found).encode() + base.read_bytes()).hexdigest()[:12]
    state_dir.mkdir(parents=True, exist_ok=True)
    out = state_dir / f"catalogue-{digest}.yaml"
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    return out, found


def describe_local(model: LocalModel) -> str:
    """One line for the log and `up`: name, where it came from, context, template, and whose price/options."""
    context = f"context {model.context_length}" if model.context_length else "context from its config"
    template = "its own chat template" if model.has_chat_template else "no chat template (plain prompts)"
    options = (
        "price and options from the catalogue entry of that name"
        if model.options_from_catalogue
        else "not in the catalogue: default price and options"
    )
    return f"{model.name} ({model.architecture} {model.kind} {model.path}): {context}, {template}; {options}"


def catalogue_with_checkpoint(base: Path, checkpoint: Path, state_dir: Path) -> tuple[Path, str]:
    """Write a catalogue = `base` + an hf_dir entry for `checkpoint`; return its path and the model name."""
    path, models = catalogue_with_local(base, [checkpoint], state_dir)
    return path, models[0].name
