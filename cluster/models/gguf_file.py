"""What a GGUF file says about itself: its tensors' quantization types, their blocks, its chat metadata.

transformers loads a GGUF de-quantized (materialize.py keeps that as the dense weights); this module reads
the same file with gguf-py's `GGUFReader` for what transformers drops on the way:

- each tensor's own type (Q4_0, Q4_K, Q8_0, Q6_K, F16, ...), which decides the engine's low-bit copy of it;
- the blocks of the types the engine's kernels hold exactly (`SourceBlocks`): Q4_0, Q4_1 and Q4_K as int4
  groups of 32 (`w = (q - 8) * scale + zero`, PyTorch's int4 weight-only layout) and Q8_0 as int8 groups
  of 32 (`w = q * scale`). Q4_K's super-blocks of 256 are 8 sub-blocks of 32 with a 6-bit scale and min
  each: scale = d * sc, zero = 8 * scale - dmin * m, the same numbers gguf-py's reference computes;
- the tokenizer's special ids beyond transformers' conversion (end-of-turn / end-of-message ids, which chat
  models stop on) and the chat template.

The block decoding is written here (not taken from gguf-py) because gguf-py only de-quantizes to floats;
the engine needs the integer codes and scales. Every decoded tensor is checked against the de-quantized
tensor transformers produced (`materialize`), so a name or layout mistake falls back to dense weights
instead of serving other values.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, ReaderTensor, get_tensor_name_map
from gguf.constants import MODEL_ARCH_NAMES

GROUP = 32  # inputs per scale of every block layout the engine holds (serve_apps.engine.quant)
BlockKind = Literal["int4", "int8_g32"]
INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")
INT8_TYPES = ("Q8_0",)
_Q = GGMLQuantizationType


@dataclass(frozen=True, slots=True)
class SourceBlocks:
    """One [rows, cols] weight's integer codes and per-32-input scales (HF row order, rows = outputs)."""

    kind: BlockKind
    q: np.ndarray  # int4: uint8 codes 0..15; int8_g32: int8 codes; [rows, cols]
    scale: np.ndarray  # float32 [rows, cols / 32]
    zero: np.ndarray  # float32 [rows, cols / 32]: int4's offset ((q - 8) * scale + zero); int8_g32: zeros

    def dense(self) -> np.ndarray:
        """The float32 values the blocks stand for."""
        rows, cols = self.q.shape
        codes = self.q.reshape(rows, cols // GROUP, GROUP).astype(np.float32)
        if self.kind == "int4":
            values = (codes - 8) * self.scale[..., None] + self.zero[..., None]
        else:
            values = codes * self.scale[..., None]
        return values.reshape(rows, cols)

    def rows(self, order: np.ndarray) -> "SourceBlocks":
        return SourceBlocks(self.kind, self.q[order], self.scale[order], self.zero[order])


@dataclass(frozen=True, slots=True)
class ChatMetadata:
    """The tokenizer facts of a GGUF (tokenizer.* keys): template and special token ids."""

    chat_template: str | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()  # eos, then end-of-turn / end-of-message ids where the file has them
    pad_token_id: int | None = None
    add_bos_token: bool | None = None
    templates: dict[str, str] = field(default_factory=dict)  # named templates (tokenizer.chat_template.<name>)


def low_bit_kind(type_name: str) -> BlockKind | None:
    """The engine's exact low-bit layout for a GGUF tensor type, or None (dense fallback)."""
    if type_name in INT4_TYPES:
        return "int4"
    if type_name in INT8_TYPES:
        return "int8_g32"
    return None


def decode_blocks(tensor: ReaderTensor) -> SourceBlocks | None:
    """The blocks of a 2-D Q4_0 / Q4_1 / Q4_K / Q8_0 tensor in GGUF row order; None for other types."""
    if len(tensor.shape) != 2:
        return None
    cols, rows = (int(n) for n in tensor.shape)  # GGUF lists ne0 (the contiguous inputs) first
    raw = np.ascontiguousarray(tensor.data).view(np.uint8).reshape(rows, -1)
    decoder = _DECODERS.get(tensor.tensor_type)
    return decoder(raw, rows, cols) if decoder is not None else None


def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)[..., 0]


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., 16] packed bytes -> [..., 32] codes: the low nibbles are elements 0..15, the high ones 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _q4_0(raw: np.ndarray, rows: int, cols: int) -> SourceBlocks:
    blocks = raw.reshape(rows, cols // GROUP, 18)
    d = _f16(blocks[..., 0:2])
    q = _nibbles(blocks[..., 2:]).reshape(rows, cols)
    return SourceBlocks("int4", q, d, np.zeros_like(d))  # w = d * (q - 8)


def _q4_1(raw: np.ndarray, rows: int, cols: int) -> SourceBlocks:
    blocks = raw.reshape(rows, cols // GROUP, 20)
    d, m = _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4])
    q = _nibbles(blocks[..., 4:]).reshape(rows, cols)
    return SourceBlocks("int4", q, d, _exact_f32(m.astype(np.float64) + 8 * d.astype(np.float64)))  # w = d * q + m


def _q4_k(raw: np.ndarray, rows: int, cols: int) -> SourceBlocks:
    supers = cols // 256
    blocks = raw.reshape(rows, supers, 144)
    d, dmin = _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4])
    sc, m = _q4_k_scale_min(blocks[..., 4:16])  # [rows, supers, 8] 6-bit each
    # 128 bytes = 4 chunks of 32: a chunk's low nibbles are sub-block 2j, its high nibbles sub-block 2j + 1.
    qs = blocks[..., 16:].reshape(rows, supers, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 1, 2, 1)
    q = (qs & 0x0F).reshape(rows, cols)
    scale = (d[..., None] * sc).reshape(rows, cols // GROUP)  # exact: 11 x 6 bits
    low = (dmin[..., None] * m).reshape(rows, cols // GROUP)
    return SourceBlocks("int4", q, scale, _exact_f32(8 * scale.astype(np.float64) - low.astype(np.float64)))


def _q4_k_scale_min(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 12 bytes of 8 six-bit scales and mins (ggml's get_scale_min_k4), as float32 [..., 8] each."""
    d, m, m_d = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    sc = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mins = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mins.astype(np.float32)


def _q8_0(raw: np.ndarray, rows: int, cols: int) -> SourceBlocks:
    blocks = raw.reshape(rows, cols // GROUP, 34)
    d = _f16(blocks[..., 0:2])
    q = np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(rows, cols)
    return SourceBlocks("int8_g32", q, d, np.zeros_like(d))


def _exact_f32(values: np.ndarray) -> np.ndarray:
    # The zero point is a sum of two exact float32 values; rounded once from float64 it is the float32
    # nearest to the true offset, which is what makes (q - 8) * scale + zero land on the reference's value.
    return values.astype(np.float32)


_DECODERS = {_Q.Q4_0: _q4_0, _Q.Q4_1: _q4_1, _Q.Q4_K: _q4_k, _Q.Q8_0: _q8_0}


def hf_tensor_names(reader: GGUFReader, hf_names: list[str]) -> dict[str, str]:
    """GGUF tensor name -> the Hugging Face name transformers gave it, for the names in `hf_names`."""
    arch = architecture(reader)
    arch_id = next((key for key, value in MODEL_ARCH_NAMES.items() if value == arch), None)
    if arch_id is None:
        return {}
    layers = int_field(reader, f"{arch}.block_count", 0)
    name_map = get_tensor_name_map(arch_id, layers)
    mapping: dict[str, str] = {}
    for hf_name in hf_names:
        stem, _, suffix = hf_name.rpartition(".")
        gguf_name = name_map.get_name(stem)
        if gguf_name is not None:
            mapping[f"{gguf_name}.{suffix}"] = hf_name
    return mapping


def hf_row_order(reader: GGUFReader, gguf_name: str, rows: int) -> np.ndarray | None:
    """The row permutation transformers applies to a tensor (llama's q/k: llama.cpp's rotary layout undone)."""
    arch = architecture(reader)
    if arch != "llama" or not (".attn_q." in gguf_name or ".attn_k." in gguf_name):
        return None
    heads = int_field(reader, "llama.attention.head_count", 0)
    kv_heads = int_field(reader, "llama.attention.head_count_kv", heads)
    n_head = heads if ".attn_q." in gguf_name else kv_heads
    if n_head <= 0 or rows % (2 * n_head):
        return None
    dim = rows // n_head // 2
    return np.arange(rows).reshape(n_head, dim, 2).swapaxes(2, 1).reshape(rows)


def architecture(reader: GGUFReader) -> str:
    return str(field_value(reader, "general.architecture") or "")


def field_value(reader: GGUFReader, key: str) -> object:
    """A metadata value (str, number, bool or list), None when the file lacks it."""
    found = reader.fields.get(key)
    return found.contents() if found is not None else None


def int_field(reader: GGUFReader, key: str, default: int) -> int:
    value = field_value(reader, key)
    return int(value) if isinstance(value, int | np.integer) else default


def chat_metadata(path: Path) -> ChatMetadata:
    """The chat template and special token ids a GGUF declares (tokenizer.* keys)."""
    reader = GGUFReader(path)

    def token_id(name: str) -> int | None:
        value = field_value(reader, f"tokenizer.ggml.{name}_token_id")
        return int(value) if isinstance(value, int | np.integer) else None

    eos = [token_id(name) for name in ("eos", "eot", "eom")]
    templates = {
        key.removeprefix("tokenizer.chat_template."): str(field_value(reader, key))
        for key in reader.fields
        if key.startswith("tokenizer.chat_template.")
    }
    template = field_value(reader, "tokenizer.chat_template")
    add_bos = field_value(reader, "tokenizer.ggml.add_bos_token")
    return ChatMetadata(
        chat_template=str(template) if template is not None else None,
        bos_token_id=token_id("bos"),
        eos_token_ids=tuple(dict.fromkeys(i for i in eos if i is not None)),
        pad_token_id=token_id("padding"),
        add_bos_token=bool(add_bos) if add_bos is not None else None,
        templates=templates,
    )
