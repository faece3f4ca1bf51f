"""Checkpoint directories that are also servable Hugging Face directories.

A full fine-tune checkpoint is `save_pretrained` output plus the tokenizer (a catalogue `hf_dir`
source loads it as is); a LoRA checkpoint holds the adapter, which `train_jobs.export` merges into
full weights. `train_state.pt` (optimizer, step) and `job.json` ride along for resuming.
"""

import json
from pathlib import Path
from typing import Any

import torch

TRAIN_STATE = "train_state.pt"
JOB_FILE = "job.json"
PRIVACY_FILE = "privacy.json"
ADAPTER_CONFIG = "adapter_config.json"


def save_checkpoint(
    directory: Path, model: Any, tokenizer: Any, train_state: dict[str, Any], job: dict[str, Any]
) -> Path:
    """Write weights (or adapter), tokenizer, optimizer state and job config to `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    torch.save(train_state, directory / TRAIN_STATE)
    (directory / JOB_FILE).write_text(json.dumps(job, indent=2, default=str))
    return directory


def is_adapter(directory: Path) -> bool:
    """True when `directory` holds a LoRA adapter rather than full weights."""
    return (directory / ADAPTER_CONFIG).exists()


def load_train_state(directory: Path) -> dict[str, Any]:
    """The optimizer/step state saved with a checkpoint (empty if there is none)."""
    path = directory / TRAIN_STATE
    return torch.load(path, weights_only=False) if path.exists() else {}


def write_privacy(directory: Path, privacy: dict[str, Any]) -> Path:
    """Store the privacy parameters and spend next to the weights they produced."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / PRIVACY_FILE
    path.write_text(json.dumps(privacy, indent=2))
    return path
