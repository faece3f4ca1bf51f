"""Train -> serve: a finished checkpoint becomes a servable HF directory and catalogue entry.

A LoRA checkpoint (DDP with `lora:` or a federated run's `adapter/`) is merged into its base
weights; a full fine-tune checkpoint is copied without the optimizer state. The result (config.json,
model.safetensors, tokenizer, privacy.json if any) is what a catalogue entry of source kind `hf_dir`
points at, so `solanalm up --model <name>` serves it.
"""

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import yaml

from cluster.models import ModelSpec
from train_jobs.checkpoint import ADAPTER_CONFIG, JOB_FILE, PRIVACY_FILE, TRAIN_STATE, is_adapter
from train_jobs.config import ModelRef
from train_jobs.task import base_model_dir, load_model

logger = logging.getLogger(__name__)


def _base_for_adapter(adapter_dir: Path, model: ModelRef | None) -> Path:
    """The base weights an adapter was trained on: explicit, from job.json, or peft's own record."""
    if model is not None:
        return base_model_dir(model)
    job_file = adapter_dir / JOB_FILE
    if job_file.exists():
        return base_model_dir(ModelRef.model_validate(json.loads(job_file.read_text())["model"]))
    recorded = json.loads((adapter_dir / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if recorded and (Path(recorded) / "config.json").exists():
        return Path(recorded)
    raise ValueError(f"{adapter_dir}: cannot tell the base model; pass it explicitly")


def merge_adapter(adapter_dir: Path, base_dir: Path, out_dir: Path) -> Path:
    """Merge LoRA weights into the base model and save full float32 weights plus tokenizer."""
    from peft import PeftModel

    base, tokenizer = load_model(base_dir)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def export_checkpoint(checkpoint_dir: Path, out_dir: Path, model: ModelRef | None = None) -> Path:
    """A servable HF directory at `out_dir` from a DDP checkpoint or a federated adapter."""
    checkpoint_dir = checkpoint_dir.expanduser().resolve()
    if is_adapter(checkpoint_dir):
        merge_adapter(checkpoint_dir, _base_for_adapter(checkpoint_dir, model), out_dir)
    else:
        if not (checkpoint_dir / "config.json").exists():
            raise FileNotFoundError(f"{checkpoint_dir} is neither an HF directory nor a LoRA adapter")
        skip = shutil.ignore_patterns(TRAIN_STATE, JOB_FILE, ".*")
        shutil.copytree(checkpoint_dir, out_dir, ignore=skip, dirs_exist_ok=True)
    if (checkpoint_dir / PRIVACY_FILE).exists():
        shutil.copy2(checkpoint_dir / PRIVACY_FILE, out_dir / PRIVACY_FILE)
    logger.info("exported %s -> %s", checkpoint_dir, out_dir)
    return out_dir


def catalogue_entry(path: Path, *, dtype: str = "float32", max_model_len: int | None = None) -> dict[str, Any]:
    """The `models:` entry (YAML mapping) that serves the exported directory."""
    entry: dict[str, Any] = {
        "source": {"kind": "hf_dir", "path": str(path.expanduser().resolve())},
        "dtype": dtype,
        "owned_by": "solanalm",
    }
    if max_model_len is not None:
        entry["max_model_len"] = max_model_len
    return entry


def register_model(catalogue: Path, name: str, path: Path, **entry_options: Any) -> ModelSpec:
    """Add (or replace) `name` in a catalogue YAML file; returns the validated entry.

    Note: rewriting the YAML drops its comments; point this at a deployment's own catalogue copy.
    """
    entry = catalogue_entry(path, **entry_options)
    spec = ModelSpec(name=name, **entry)
    raw = yaml.safe_load(catalogue.read_text()) if catalogue.exists() else {}
    raw = raw or {}
    raw.setdefault("models", {})[name] = entry
    raw.setdefault("default", name)
    catalogue.write_text(yaml.safe_dump(raw, sort_keys=False))
    return spec
