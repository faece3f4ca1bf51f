"""GGUF blocks -> the engine's low-bit copies, bit for bit against gguf-py's reference de-quantizer."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from gguf.quants import dequantize as gguf_dequantize

from cluster.models.gguf_encode import encode, encode_q4_k, encode_q5_k, encode_q6_k, q4_k_m_type
from cluster.models.gguf_file import decode_blocks, hf_row_order, low_bit_kind
from cluster.models.gguf_weights import read_blocks, read_index, write_source_weights
from cluster.network.model_cost import packed_bytes
from serve_apps.engine.gguf_source import SourceWeights, weights_summary
from serve_apps.engine.quant import dequantize, int4_from_blocks, int8_g32_from_blocks

Q = GGMLQuantizationType
ROWS, COLS = 48, 512


def _weights(seed: int = 0, rows: int = ROWS, cols: int = COLS) -> np.ndarray:
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((rows, cols)) * 0.05
    values[:, :32] += 0.2  # a block that is all positive: Q4_K's min must stay <= 0, Q4_0's scale is signed
    return values.astype(np.float32)


def _write(path: Path, tensors: dict[str, tuple[np.ndarray, GGMLQuantizationType]], arch: str = "llama") -> Path:
    writer = GGUFWriter(path, arch)
    writer.add_block_count(1)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    for name, (values, qtype) in tensors.items():
        data, used = encode(values, qtype)
        writer.add_tensor(name, data, raw_dtype=used)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def typed_file(tmp_path_factory: pytest.TempPathFactory) -> GGUFReader:
    tensors = {f"t.{qtype.name}.weight": (_weights(i), qtype) for i, qtype in enumerate(_ALL_TYPES)}
    return GGUFReader(_write(tmp_path_factory.mktemp("gguf") / "typed.gguf", tensors))


_EXACT = [Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q8_0]
_ALL_TYPES = [*_EXACT, Q.Q5_K, Q.Q6_K, Q.F16, Q.BF16, Q.Q5_0]


def _tensor(reader: GGUFReader, qtype: GGMLQuantizationType):  # type: ignore[no-untyped-def]
    return next(t for t in reader.tensors if t.name == f"t.{qtype.name}.weight")


@pytest.mark.parametrize("qtype", _EXACT, ids=lambda q: q.name)
def test_engine_copy_is_the_files_own_values_bit_for_bit(typed_file: GGUFReader, qtype: GGMLQuantizationType) -> None:
    tensor = _tensor(typed_file, qtype)
    assert tensor.tensor_type == qtype
    reference = torch.from_numpy(gguf_dequantize(tensor.data, tensor.tensor_type))
    blocks = decode_blocks(tensor)
    assert blocks is not None and blocks.kind == low_bit_kind(qtype.name)
    assert np.array_equal(blocks.dense(), reference.numpy())
    q, scale, zero = (torch.from_numpy(a) for a in (blocks.q, blocks.scale, blocks.zero))
    if blocks.kind == "int4":
        low = int4_from_blocks(q, scale, zero, torch.float32)
    else:
        low = int8_g32_from_blocks(q, scale, torch.float32)
    assert low.kind == blocks.kind
    assert torch.equal(dequantize(low, COLS), reference)  # what its matmul multiplies by, bit for bit
    x = torch.randn(3, COLS)
    torch.testing.assert_close(low.matmul(x), x @ reference.t(), atol=1e-4, rtol=1e-4)
    assert low.nbytes == packed_bytes(ROWS, COLS, low.kind, 4)


def test_int8_g32_reads_the_bytes_of_int8_codes() -> None:
    """Two int4 planes: one byte a weight, as Q8_0's codes, plus two (scale, zero) pairs per 32 inputs."""
    assert packed_bytes(ROWS, COLS, "int8_g32", 2) == ROWS * COLS + 2 * (COLS // 32) * ROWS * 2 * 2


@pytest.mark.parametrize("qtype", [Q.Q5_K, Q.Q6_K, Q.F16, Q.BF16, Q.Q5_0], ids=lambda q: q.name)
def test_other_types_have_no_exact_low_bit_layout(typed_file: GGUFReader, qtype: GGMLQuantizationType) -> None:
    tensor = _tensor(typed_file, qtype)
    assert tensor.tensor_type == qtype
    assert decode_blocks(tensor) is None and low_bit_kind(qtype.name) is None


@pytest.mark.parametrize(
    ("encoder", "qtype", "levels"), [(encode_q4_k, Q.Q4_K, 15), (encode_q5_k, Q.Q5_K, 31), (encode_q6_k, Q.Q6_K, 63)]
)
def test_k_quant_encoders_round_trip_through_gguf_py(encoder, qtype: GGMLQuantizationType, levels: int) -> None:  # type: ignore[no-untyped-def]
    """Blocks from our encoders de-quantize (gguf-py's reference) to within a fraction of a sub-block's step
    of the input: a wrong byte layout would be off by the whole range."""
    values = _weights(3, rows=8, cols=512)
    blocks = encoder(values)
    assert blocks.shape == (8, 512 // 256 * {Q.Q4_K: 144, Q.Q5_K: 176, Q.Q6_K: 210}[qtype])
    back = gguf_dequantize(blocks, qtype)
    sub = 16 if qtype == Q.Q6_K else 32
    spread = values.reshape(8, -1, sub)
    step = (spread.max(-1) - np.minimum(spread.min(-1), 0)) / levels
    error = np.abs(back - values).reshape(8, -1, sub).max(-1)
    assert bool((error <= 0.75 * step + 0.02 * np.abs(spread).max()).all()), float((error / step).max())


def test_k_quants_of_ragged_inputs_take_llama_cpp_fallbacks() -> None:
    values = _weights(4, rows=4, cols=576)  # SmolLM2's hidden size: 2.25 super-blocks
    assert encode(values, Q.Q4_K)[1] == Q.Q5_0 and encode(values, Q.Q6_K)[1] == Q.Q8_0
    assert q4_k_m_type("token_embd.weight", 30) == Q.Q6_K and q4_k_m_type("blk.0.ffn_down.weight", 30) == Q.Q6_K
    assert q4_k_m_type("blk.4.ffn_down.weight", 30) == Q.Q4_K and q4_k_m_type("blk.4.attn_q.weight", 30) == Q.Q4_K


def test_llama_q_rows_follow_transformers_reverse_permutation(tmp_path: Path) -> None:
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    values = _weights(5, rows=64, cols=256)
    reader = GGUFReader(_write(tmp_path / "q.gguf", {"blk.0.attn_q.weight": (values, Q.Q8_0)}))
    order = hf_row_order(reader, "blk.0.attn_q.weight", 64)
    processor = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 2})
    expected = processor.process(np.arange(64), "blk.0.attn_q.weight").weights
    assert order is not None and np.array_equal(order, expected)
    assert hf_row_order(reader, "blk.0.attn_v.weight", 64) is None


def test_side_files_keep_blocks_only_where_they_match_the_dense_tensor(tmp_path: Path) -> None:
    gate, down, up = _weights(6, rows=64, cols=256), _weights(7, rows=64, cols=256), _weights(8, rows=64, cols=256)
    path = _write(
        tmp_path / "m.gguf",
        {
            "blk.0.ffn_gate.weight": (gate, Q.Q4_K),
            "blk.0.ffn_down.weight": (down, Q.Q6_K),
            "blk.0.ffn_up.weight": (up, Q.Q8_0),
        },
    )
    reader = GGUFReader(path)
    dense = {
        f"model.layers.0.mlp.{name}_proj.weight": torch.from_numpy(gguf_dequantize(t.data, t.tensor_type))
        for name, t in zip(("gate", "down", "up"), reader.tensors, strict=True)
    }
    dense["model.layers.0.mlp.up_proj.weight"] = dense["model.layers.0.mlp.up_proj.weight"] + 1e-3  # not the file's
    write_source_weights(path, dense, tmp_path)
    index = read_index(tmp_path)
    assert index is not None
    assert index["types"] == {
        "model.layers.0.mlp.gate_proj.weight": "Q4_K",
        "model.layers.0.mlp.down_proj.weight": "Q6_K",
        "model.layers.0.mlp.up_proj.weight": "Q8_0",
    }
    assert index["low_bit"] == {"model.layers.0.mlp.gate_proj.weight": "int4"}
    assert "no exact low-bit layout" in index["dense_fallback"]["model.layers.0.mlp.down_proj.weight"]
    assert "differ" in index["dense_fallback"]["model.layers.0.mlp.up_proj.weight"]
    back = read_blocks(tmp_path, "model.layers.0.mlp.gate_proj.weight", "int4")
    assert torch.equal(torch.from_numpy(back.dense()), dense["model.layers.0.mlp.gate_proj.weight"])

    source = SourceWeights.load(tmp_path)
    assert source is not None
    source.stage_tensors = sorted(index["types"])
    gate_name, up_name = "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"
    assert source.copy_for("layers.0.gate_up_proj", [gate_name, up_name], torch.float32) is None
    low = source.copy_for("layers.0.gate_proj", [gate_name], torch.float32)
    assert low is not None
    summary = weights_summary(source, [low], quantized=True)
    assert summary["gguf_types"] == {"Q4_K": 1, "Q6_K": 1, "Q8_0": 1} and summary["low_bit"] == {"int4": 1}
    reasons = summary["dense_fallback"]
    assert isinstance(reasons, list) and len(reasons) == 1
    reason = str(reasons[0])
    assert reason.startswith("layers.0.gate_up_proj: Q8_0") and "differ" in reason
    assert json.loads(json.dumps(summary)) == summary
    assert weights_summary(None, [], quantized=False)["dense_fallback"]


def test_placement_counts_each_layers_copies_by_their_gguf_kind(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from cluster.network.model_cost import gguf_layer_packed_bytes

    assert gguf_layer_packed_bytes(tmp_path, 2) is None  # not from a GGUF: the catalogue's weight_quant counts
    names = {f"model.layers.{i}.mlp.{p}_proj.weight": torch.zeros(64, 256) for i in (0, 1) for p in ("up", "down")}
    save_file(names, str(tmp_path / "model.safetensors"))
    kinds = {"model.layers.0.mlp.up_proj.weight": "int4", "model.layers.1.mlp.up_proj.weight": "int8_g32"}
    (tmp_path / "gguf").mkdir()
    (tmp_path / "gguf" / "weights.json").write_text(json.dumps({"types": {}, "low_bit": kinds, "dense_fallback": {}}))
    assert gguf_layer_packed_bytes(tmp_path, 2) == packed_bytes(64, 256, "int8_g32", 2)  # the larger layer's


def test_a_fused_checkpoint_tensor_is_its_own_part(tmp_path: Path) -> None:
    (tmp_path / "gguf").mkdir()
    types = {"model.layers.0.self_attn.qkv_proj.weight": "Q8_0", "model.layers.0.mlp.gate_proj.weight": "Q4_K"}
    (tmp_path / "gguf" / "weights.json").write_text(json.dumps({"types": types, "low_bit": {}, "dense_fallback": {}}))
    source = SourceWeights.load(tmp_path)
    assert source is not None
    parts = source.layer_parts(0)
    assert parts["qkv_proj"] == ["model.layers.0.self_attn.qkv_proj.weight"]  # Phi-3
    assert parts["gate_up_proj"] == ["model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"]
