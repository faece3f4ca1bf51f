"""The GGUF side files of a materialised model: each tensor's source type and its exact low-bit blocks.

`materialize` writes, next to the de-quantized safetensors, a folder `gguf/`:

- `weights.json`: {"file": the GGUF's name, "types": {hf tensor name: GGUF type}, "low_bit": {hf name:
  "int4" | "int8_g32"}, "dense_fallback": {hf name: why it has no low-bit copy}};
- `blocks.safetensors`: for each name in "low_bit", `<name>.q` (int4: two codes a byte, the low nibble
  first; int8_g32: int8 codes), `<name>.scale` and `<name>.zero` (float32, one per 32 inputs).

A tensor's blocks are written only when the values they stand for equal, bit for bit in float32, the
de-quantized tensor transformers loaded (the dense weights): the stage's low-bit copy then holds the
file's own values. The stage reads these files through `serve_apps.engine.gguf_source`.
"""

import json
import logging
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader
from safetensors.numpy import save_file

from cluster.models.gguf_file import SourceBlocks, decode_blocks, hf_row_order, hf_tensor_names, low_bit_kind

logger = logging.getLogger(__name__)

WEIGHTS_DIR = "gguf"
INDEX_FILE = "weights.json"
BLOCKS_FILE = "blocks.safetensors"


def write_source_weights(gguf: Path, dense: dict[str, torch.Tensor], out: Path) -> dict[str, object]:
    """Write `out/gguf/` for the GGUF `gguf` whose de-quantized tensors (HF names) are `dense`; the index."""
    reader = GGUFReader(gguf)
    names = hf_tensor_names(reader, list(dense))
    types: dict[str, str] = {}
    low_bit: dict[str, str] = {}
    fallback: dict[str, str] = {}
    arrays: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        hf_name = names.get(tensor.name)
        if hf_name is None:
            continue
        type_name = tensor.tensor_type.name
        types[hf_name] = type_name
        if len(tensor.shape) != 2:
            continue
        blocks, reason = _checked_blocks(reader, tensor, dense[hf_name])
        if blocks is None:
            fallback[hf_name] = reason
            continue
        low_bit[hf_name] = blocks.kind
        arrays.update(_arrays(hf_name, blocks))
    index: dict[str, object] = {"file": gguf.name, "types": types, "low_bit": low_bit, "dense_fallback": fallback}
    folder = out / WEIGHTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    save_file(arrays, str(folder / BLOCKS_FILE))
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
    logger.info("%s: %d tensors with exact low-bit blocks, %d dense", gguf.name, len(low_bit), len(fallback))
    return index


def _checked_blocks(reader: GGUFReader, tensor, dense: torch.Tensor) -> tuple[SourceBlocks | None, str]:  # type: ignore[no-untyped-def]
    type_name = tensor.tensor_type.name
    if low_bit_kind(type_name) is None:
        return None, f"{type_name} has no exact low-bit layout in the engine"
    blocks = decode_blocks(tensor)
    if blocks is None:
        return None, f"{type_name} blocks of shape {list(tensor.shape)} cannot be decoded"
    order = hf_row_order(reader, tensor.name, blocks.q.shape[0])
    if order is not None:
        blocks = blocks.rows(order)
    values = torch.from_numpy(blocks.dense()).to(dense.dtype)
    if values.shape != dense.shape or not torch.equal(values, dense):
        return None, f"{type_name} blocks differ from the de-quantized tensor transformers loaded"
    return blocks, ""


def _arrays(name: str, blocks: SourceBlocks) -> dict[str, np.ndarray]:
    q = blocks.q
    if blocks.kind == "int4":
        q = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)  # two codes a byte: halves the side file
    return {f"{name}.q": np.ascontiguousarray(q), f"{name}.scale": blocks.scale, f"{name}.zero": blocks.zero}


def read_index(model_dir: Path) -> dict[str, dict[str, str]] | None:
    """The `gguf/weights.json` of a materialised model, None when it has none (not from a GGUF)."""
    path = model_dir / WEIGHTS_DIR / INDEX_FILE
    if not path.exists():
        return None
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def read_blocks(model_dir: Path, name: str, kind: str) -> SourceBlocks:
    """One tensor's blocks back from `gguf/blocks.safetensors`."""
    from safetensors import safe_open

    with safe_open(str(model_dir / WEIGHTS_DIR / BLOCKS_FILE), framework="numpy") as handle:
        q, scale, zero = (handle.get_tensor(f"{name}.{part}") for part in ("q", "scale", "zero"))
    if kind == "int4":
        q = np.stack([q & 0x0F, q >> 4], axis=-1).reshape(q.shape[0], -1)
    return SourceBlocks(kind, q, scale, zero)  # type: ignore[arg-type]
