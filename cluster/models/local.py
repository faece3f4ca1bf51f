"""Serving a local checkpoint directory (e.g. a fine-tune) by adding it to a derived catalogue."""

import hashlib
import json
from pathlib import Path

import yaml


def catalogue_with_checkpoint(base: Path, checkpoint: Path, state_dir: Path) -> tuple[Path, str]:
    """Write a catalogue = `base` + an hf_dir entry for `checkpoint`; return its path and the model name."""
    checkpoint = checkpoint.expanduser().resolve()
    config = checkpoint / "config.json"
    if not config.exists():
        raise FileNotFoundError(f"{checkpoint} is not a Hugging Face checkpoint (no config.json)")
    raw = yaml.safe_load(base.read_text()) or {}
    name = checkpoint.name
    dtype = json.loads(config.read_text()).get("dtype") or json.loads(config.read_text()).get("torch_dtype")
    raw.setdefault("models", {})[name] = {
        "source": {"kind": "hf_dir", "path": str(checkpoint)},
        "dtype": dtype if dtype in ("float32", "bfloat16") else "float32",
        "owned_by": "local",
    }
    digest = hashlib.sha256(str(checkpoint).encode()).hexdigest()[:12]
    state_dir.mkdir(parents=True, exist_ok=True)
    out = state_dir / f"catalogue-{digest}.yaml"
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    return out, name
