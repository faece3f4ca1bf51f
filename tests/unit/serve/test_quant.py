"""Weight-only int4/int8 copies: exact where the weights are representable, used only for small steps."""

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cluster.network.model_cost import fp16_gemm_available, head_copy_kind
from serve_apps.engine.layer_split import split_layers
from serve_apps.engine.quant import INT4_GROUP, dequantize, project, quantize
from serve_apps.engine.stage_model import StageModel
from serve_apps.engine.stage_worker import StageConfig, StageWorker
from tests.unit.serve.test_stage_worker import PROMPT, run_pipeline


def q4_representable(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """A matrix made of Q4_1 blocks (w = d * q + m, q = 0..15, every block using 0 and 15), as a GGUF's."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (rows, cols // INT4_GROUP, INT4_GROUP), generator=generator)
    q[..., 0], q[..., 1] = 0, 15
    d = torch.rand(rows, cols // INT4_GROUP, 1, generator=generator) * 0.02 + 0.001
    m = -torch.rand(rows, cols // INT4_GROUP, 1, generator=generator) * 0.1
    return (q * d + m).view(rows, cols)


def test_int4_holds_q4_blocks_exactly() -> None:
    weight = q4_representable(96, 128)
    low = quantize(weight, "int4")
    assert low is not None and low.kind == "int4"
    torch.testing.assert_close(dequantize(low, 128), weight, atol=1e-6, rtol=0)
    x = torch.randn(3, 128)
    torch.testing.assert_close(low.matmul(x), x @ weight.t(), atol=1e-4, rtol=1e-4)
    assert low.nbytes < weight.numel() * weight.element_size() / 4


def test_int8_error_is_within_half_a_step() -> None:
    weight = torch.randn(64, 48)
    low = quantize(weight, "int8")
    assert low is not None
    step = weight.abs().amax(dim=1, keepdim=True) / 127
    assert bool(((dequantize(low, 48) - weight).abs() <= step / 2 + 1e-7).all())


needs_fbgemm = pytest.mark.skipif(not fp16_gemm_available(), reason="FBGEMM (x86 torch builds) only")


@needs_fbgemm
def test_fp16_copy_holds_bfloat16_weights_exactly() -> None:
    weight = (torch.randn(96, 64) * 0.05).to(torch.bfloat16)
    low = quantize(weight, "fp16")
    assert low is not None and low.kind == "fp16" and low.nbytes == 96 * 512 * 2  # 64 inputs padded to 512
    # Exact but for values below fp16's normal range (2**-14), held to its subnormal step (2**-24).
    torch.testing.assert_close(dequantize(low, 64), weight.float(), atol=2**-24, rtol=0)
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    out = low.matmul(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), x.float() @ weight.float().t(), atol=2e-2, rtol=1e-2)


@needs_fbgemm
def test_fp16_copy_bytes_are_what_the_process_really_holds() -> None:
    """FBGEMM pads the inputs to blocks of 512: 576 inputs hold 1024 (SmolLM2's head: 96 MiB, not 54)."""
    import ctypes
    import gc

    import psutil

    weight = torch.randn(8192, 576)  # float32 already: packing makes no temporary copy to count
    gc.collect()
    # Free heap left by earlier tests (a tokenizer loaded and dropped) would hold the packed copy unseen by RSS.
    ctypes.CDLL(None).malloc_trim(0)
    before = psutil.Process().memory_info().rss
    low = quantize(weight, "fp16")
    gc.collect()
    held = psutil.Process().memory_info().rss - before
    assert low is not None and low.nbytes == 8192 * 1024 * 2
    assert abs(held - low.nbytes) < 0.15 * low.nbytes, (held, low.nbytes)


@needs_fbgemm
def test_fp16_refuses_weights_out_of_its_range_and_the_head_falls_back_to_int8() -> None:
    weight = torch.randn(8, 64)
    weight[3, 5] = 1e5
    assert quantize(weight, "fp16") is None
    assert head_copy_kind() == "fp16"
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    stage = StageModel(config, split_layers(1, 1)[0])
    for param in stage.parameters():
        torch.nn.init.normal_(param)
    stage.quantize("int4", 8)
    assert stage.lm_head_low_bit is not None and stage.lm_head_low_bit.kind == "fp16"
    with torch.no_grad():
        stage.lm_head[0, 0] = 1e5  # type: ignore[index]
    stage.quantize("int4", 8)
    assert stage.lm_head_low_bit is not None and stage.lm_head_low_bit.kind == "int8"


def test_int4_refuses_inputs_that_are_not_whole_groups() -> None:
    assert quantize(torch.randn(8, INT4_GROUP + 8), "int4") is None
    assert quantize(torch.randn(8, INT4_GROUP + 8), "int8") is not None


def test_project_uses_the_low_bit_copy_only_for_small_steps() -> None:
    dense, other = torch.randn(16, 64), q4_representable(16, 64, seed=3)
    low = quantize(other, "int4")  # deliberately another matrix: which one answered shows the path taken
    small, large = torch.randn(2, 64), torch.randn(5, 64)
    torch.testing.assert_close(project(small, dense, low, max_rows=4), small @ other.t(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(project(large, dense, low, max_rows=4), large @ dense.t(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(project(small, dense, None, max_rows=4), small @ dense.t(), atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def tiny_q4_dir(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with every projection made of Q4_1 blocks and the embedding of int8 rows (a GGUF's)."""
    model = LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("proj.weight"):
                param.copy_(dequantize(quantize(param, "int4"), param.shape[1]))  # type: ignore[arg-type]
            elif name.endswith("embed_tokens.weight"):
                param.copy_(dequantize(quantize(param, "int8"), param.shape[1]))  # type: ignore[arg-type]
    path = tmp_path_factory.mktemp("tiny-q4")
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("quant", ["int4", "int8"])
def test_low_bit_stages_decode_the_same_tokens_as_dense(tiny_q4_dir: Path, quant: str) -> None:
    def workers(weight_quant: str) -> list[StageWorker]:
        return [
            StageWorker(StageConfig(str(tiny_q4_dir), spec, "float32", 2, 64, 1, "", weight_quant, 6))  # type: ignore[arg-type]
            for spec in split_layers(6, 2)
        ]

    quantized = workers(quant)
    assert quantized[0].model.low_bit_bytes() > 0 and quantized[1].model.lm_head_low_bit is not None
    assert run_pipeline(quantized, PROMPT, 12) == run_pipeline(workers("none"), PROMPT, 12)
