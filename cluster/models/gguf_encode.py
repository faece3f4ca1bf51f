"""Write GGUF files in code: K-quant encoders gguf-py lacks, a re-quantizer, and a tiny Llama GGUF for tests.

gguf-py (`gguf.quants.quantize`) encodes F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 but only de-quantizes
the K-quants; `encode_q4_k`, `encode_q5_k` and `encode_q6_k` pack valid blocks from a plain min/max (Q4_K,
Q5_K) or absolute-max (Q6_K) fit per sub-block: the same block layout llama.cpp writes, not its error-
minimising search, so a file from here is a little less accurate than llama.cpp's own of the same type.
Each is checked against gguf-py's reference de-quantizer in tests/unit/models/test_gguf_quants.py.

`requantize` rewrites a GGUF (all its metadata kept) with other tensor types, as llama.cpp's quantizer
does (llama-cpp-python, which has it, builds llama.cpp from source: ~20 min here). `Q4_K_M` follows
llama.cpp's recipe: Q6_K for the tied embedding / output and for attn_v and ffn_down in the first and last
eighth of the layers and every third one between, Q4_K elsewhere; a matrix whose inputs are not whole
super-blocks of 256 takes llama.cpp's fallback (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0).
"""

from collections.abc import Callable
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import dequantize, quantize

QK_K = 256
_Q = GGMLQuantizationType
_K_FALLBACK = {_Q.Q4_K: _Q.Q5_0, _Q.Q5_K: _Q.Q5_1, _Q.Q6_K: _Q.Q8_0}


def _f16(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den == 0, 0, num / np.where(den == 0, 1, den))


def _scale_min_bytes(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins [n, 8] -> ggml's 12-byte packing (inverse of get_scale_min_k4)."""
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    out = np.empty((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = (m[:, :4] & 0x3F) | ((m[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)
    return out


def _affine_k(x: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Super-blocks x [n, 256] -> d, dmin (f16 [n, 1]), sc, m (0..63 [n, 8]), q (0..levels [n, 8, 32])."""
    sub = x.reshape(-1, 8, 32)
    low = np.minimum(sub.min(axis=-1), 0)  # the min is subtracted: ggml keeps it <= 0
    scale = (sub.max(axis=-1) - low) / levels
    d, dmin = _f16(scale.max(axis=-1, keepdims=True) / 63), _f16(-low.min(axis=-1, keepdims=True) / 63)
    sc = np.clip(np.round(_safe_div(scale, d.astype(np.float32))), 0, 63)
    m = np.clip(np.round(_safe_div(-low, dmin.astype(np.float32))), 0, 63)
    step = (d.astype(np.float32) * sc)[..., None]
    offset = (dmin.astype(np.float32) * m)[..., None]
    q = np.clip(np.round(_safe_div(sub + offset, step)), 0, levels).astype(np.uint8)
    return d, dmin, sc, m, q


def encode_q4_k(x: np.ndarray) -> np.ndarray:
    """float32 [rows, cols] (cols % 256 == 0) -> Q4_K blocks, uint8 [rows, cols / 256 * 144]."""
    rows = x.shape[0]
    d, dmin, sc, m, q = _affine_k(x.reshape(-1, QK_K), 15)
    chunks = q.reshape(-1, 4, 2, 32)  # chunk c: sub-block 2c in the low nibbles, 2c + 1 in the high ones
    qs = (chunks[:, :, 0] | (chunks[:, :, 1] << 4)).reshape(-1, 128)
    blocks = np.concatenate([d.view(np.uint8), dmin.view(np.uint8), _scale_min_bytes(sc, m), qs], axis=-1)
    return blocks.reshape(rows, -1)


def encode_q5_k(x: np.ndarray) -> np.ndarray:
    """float32 [rows, cols] -> Q5_K blocks, uint8 [rows, cols / 256 * 176]."""
    rows = x.shape[0]
    d, dmin, sc, m, q = _affine_k(x.reshape(-1, QK_K), 31)
    low = (q & 0x0F).reshape(-1, 4, 2, 32)
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)
    high = (q >> 4).reshape(-1, 8, 32)  # bit s of byte i: the fifth bit of sub-block s, element i
    qh = np.bitwise_or.reduce(high << np.arange(8, dtype=np.uint8).reshape(1, 8, 1), axis=1).astype(np.uint8)
    blocks = np.concatenate([d.view(np.uint8), dmin.view(np.uint8), _scale_min_bytes(sc, m), qh, qs], axis=-1)
    return blocks.reshape(rows, -1)


def encode_q6_k(x: np.ndarray) -> np.ndarray:
    """float32 [rows, cols] -> Q6_K blocks, uint8 [rows, cols / 256 * 210]: 16 int8 scales of 16 values."""
    rows = x.shape[0]
    sub = x.reshape(-1, 16, 16)
    scale = np.abs(sub).max(axis=-1) / 31
    d = _f16(scale.max(axis=-1, keepdims=True) / 127)
    sc = np.clip(np.round(_safe_div(scale, d.astype(np.float32))), -128, 127)
    step = (d.astype(np.float32) * sc)[..., None]
    u = (np.clip(np.round(_safe_div(sub, step)), -32, 31) + 32).astype(np.uint8).reshape(-1, 2, 128)
    low, high = u & 0x0F, u >> 4
    ql = (low[:, :, :64] | (low[:, :, 64:] << 4)).reshape(-1, 128)
    quarters = high.reshape(-1, 2, 4, 32)  # bits 2s..2s+1 of byte i: quarter s of the half, element i
    qh = np.bitwise_or.reduce(quarters << (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1), axis=2)
    scales = sc.astype(np.int8).view(np.uint8)
    blocks = np.concatenate([ql, qh.reshape(-1, 64).astype(np.uint8), scales, d.view(np.uint8)], axis=-1)
    return blocks.reshape(rows, -1)


_K_ENCODERS: dict[GGMLQuantizationType, Callable[[np.ndarray], np.ndarray]] = {
    _Q.Q4_K: encode_q4_k,
    _Q.Q5_K: encode_q5_k,
    _Q.Q6_K: encode_q6_k,
}


def encode(x: np.ndarray, qtype: GGMLQuantizationType) -> tuple[np.ndarray, GGMLQuantizationType]:
    """x [rows, cols] float32 in `qtype` (or llama.cpp's fallback for it): the raw data and the type used."""
    if qtype in _K_ENCODERS:
        if x.shape[-1] % QK_K:
            return encode(x, _K_FALLBACK[qtype])
        return _K_ENCODERS[qtype](x.astype(np.float32)), qtype
    if qtype == _Q.F32:
        return x.astype(np.float32), qtype
    return quantize(x.astype(np.float32), qtype), qtype


def q4_k_m_type(name: str, layers: int) -> GGMLQuantizationType:
    """llama.cpp's Q4_K_M choice for a 2-D tensor (llama_tensor_get_type, simplified)."""
    if name in ("output.weight", "token_embd.weight"):
        return _Q.Q6_K
    if ".attn_v." in name or ".ffn_down." in name:
        layer = int(name.split(".")[1])
        more_bits = layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2
        return _Q.Q6_K if more_bits else _Q.Q4_K
    return _Q.Q4_K


def requantize(src: Path, dst: Path, choose: Callable[[str, int], GGMLQuantizationType]) -> dict[str, int]:
    """Rewrite the GGUF `src` as `dst` with 2-D tensors in `choose(name, layers)` (1-D ones stay F32): the
    count of tensors per type written."""
    reader = GGUFReader(src)
    arch = str(reader.fields["general.architecture"].contents())
    layers = int(reader.fields[f"{arch}.block_count"].contents())  # type: ignore[call-overload]
    writer = GGUFWriter(dst, arch)
    copy_metadata(reader, writer)
    counts: dict[str, int] = {}
    for tensor in reader.tensors:
        values = dequantize(tensor.data, tensor.tensor_type)
        wanted = choose(tensor.name, layers) if values.ndim == 2 else _Q.F32
        data, used = encode(values, wanted)
        writer.add_tensor(tensor.name, data, raw_dtype=used)
        counts[used.name] = counts.get(used.name, 0) + 1
    _finish(writer)
    return counts


def copy_metadata(reader: GGUFReader, writer: GGUFWriter, prefix: str = "") -> None:
    """Copy every key of `reader` starting with `prefix` (bar the header and architecture) into `writer`."""
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or not key.startswith(prefix):
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type)


def _finish(writer: GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_tiny_llama_gguf(
    path: Path,
    tokenizer_gguf: Path | GGUFReader,
    qtype: GGMLQuantizationType | Callable[[str], GGMLQuantizationType],
    *,
    layers: int = 2,
    hidden: int = 256,
    seed: int = 0,
    extra_metadata: dict[str, int] | None = None,
) -> Path:
    """A random Llama GGUF shaped like SmolLM2 (GQA, tied embedding), its 2-D tensors in `qtype` (one type
    or a choice per tensor name), with the tokenizer and chat template of `tokenizer_gguf` (a real one) and
    `extra_metadata` (uint32 keys, e.g. tokenizer.ggml.eot_token_id)."""
    source = tokenizer_gguf if isinstance(tokenizer_gguf, GGUFReader) else GGUFReader(tokenizer_gguf)
    vocab = len(source.fields["tokenizer.ggml.tokens"].data)
    heads, kv_heads, inter = 4, 2, 2 * hidden
    writer = GGUFWriter(path, "llama")
    writer.add_name("tiny-llama")
    writer.add_block_count(layers)
    writer.add_context_length(512)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(inter)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_vocab_size(vocab)
    copy_metadata(source, writer, prefix="tokenizer.")
    for key, value in (extra_metadata or {}).items():
        writer.add_uint32(key, value)
    rng = np.random.default_rng(seed)
    head_dim = hidden // heads
    shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,)}
    for i in range(layers):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (hidden,),
            f"blk.{i}.attn_q.weight": (heads * head_dim, hidden),
            f"blk.{i}.attn_k.weight": (kv_heads * head_dim, hidden),
            f"blk.{i}.attn_v.weight": (kv_heads * head_dim, hidden),
            f"blk.{i}.attn_output.weight": (hidden, heads * head_dim),
            f"blk.{i}.ffn_norm.weight": (hidden,),
            f"blk.{i}.ffn_gate.weight": (inter, hidden),
            f"blk.{i}.ffn_up.weight": (inter, hidden),
            f"blk.{i}.ffn_down.weight": (hidden, inter),
        }
    for name, shape in shapes.items():
        if len(shape) == 1:
            writer.add_tensor(name, (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32))
            continue
        values = (rng.standard_normal(shape) * (0.5 if name == "token_embd.weight" else 0.08)).astype(np.float32)
        wanted = qtype(name) if callable(qtype) else qtype
        data, used = encode(values, wanted)
        writer.add_tensor(name, data, raw_dtype=used)
    _finish(writer)
    return path
