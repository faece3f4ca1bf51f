"""The stage's device abstraction: selection, dtype, pinned-buffer sizes and KV planning from a given free-memory
figure run on CPU; the CUDA comparisons are marked gpu and skipped where torch sees no CUDA device."""

from pathlib import Path

import pytest
import torch

from cluster.config import Settings
from serve_apps.engine.decoder import CausalAttention
from serve_apps.engine.device import (
    HostStaging,
    StageDevice,
    choose_device,
    max_step_tokens,
    stage_dtype,
    staging_bytes,
)
from serve_apps.engine.kv_cache import (
    GPU_RUNTIME_BYTES,
    activation_headroom_bytes,
    device_kv_budget,
    kv_bytes_per_token,
    plan_kv_slots,
)
from serve_apps.engine.layer_split import split_layers
from serve_apps.engine.messages import SamplingParams, SeqChunk, StepBatch
from serve_apps.engine.stage_model import load_config
from serve_apps.engine.stage_worker import StageConfig, StageWorker
from serve_apps.server.pipeline_server import _plan_kv, stages_on_gpu
from serve_apps.server.stages import stage_recipe

GiB = 2**30
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def test_a_gpu_bundle_computes_on_cuda_where_torch_has_it() -> None:
    assert choose_device("auto", 1.0, cuda_available=True).kind == "cuda"
    assert choose_device("auto", 0.0, cuda_available=True, visible_gpus=[0]).kind == "cuda"  # Ray assigned one


def test_a_cpu_bundle_or_a_cpu_setting_stays_on_cpu() -> None:
    assert choose_device("auto", 0.0, cuda_available=True).kind == "cpu"
    assert choose_device("cpu", 1.0, cuda_available=True, visible_gpus=[0]).kind == "cpu"


def test_a_gpu_bundle_without_cuda_falls_back_to_cpu_but_forcing_cuda_is_refused() -> None:
    assert choose_device("auto", 1.0, cuda_available=False).kind == "cpu"
    with pytest.raises(ValueError, match="no CUDA device"):
        choose_device("cuda", 1.0, cuda_available=False)


def test_dtype_is_the_catalogues_on_cpu_and_half_precision_on_cuda() -> None:
    assert [stage_dtype("cpu", d) for d in ("float32", "bfloat16", "float16")] == ["float32", "bfloat16", "float16"]
    assert stage_dtype("cuda", "float32") == "bfloat16"
    assert stage_dtype("cuda", "bfloat16") == "bfloat16"
    assert stage_dtype("cuda", "float16") == "float16"
    assert stage_dtype("cuda", "float32", bf16_supported=False) == "float16"
    with pytest.raises(ValueError, match="unknown dtype"):
        stage_dtype("cuda", "float64")


def test_pinned_buffers_hold_the_largest_step() -> None:
    tokens = max_step_tokens(max_batch_size=32, prefill_chunk=512)
    assert tokens == 544
    assert staging_bytes(tokens, 576, torch.bfloat16) == 544 * 576 * 2  # SmolLM2-135M's width
    assert staging_bytes(tokens, 4096, torch.float32) == 544 * 4096 * 4
    with pytest.raises(ValueError):
        staging_bytes(0, 576, torch.bfloat16)


def test_a_staging_buffer_grows_for_a_larger_step() -> None:
    staging = HostStaging(4, 8, torch.float32, pin=False)  # pinning needs a CUDA driver
    assert staging.nbytes == 4 * 8 * 4 and staging.rows(3).shape == (3, 8)
    assert staging.rows(10).shape == (10, 8) and staging.nbytes == 10 * 8 * 4


def test_the_cpu_device_changes_nothing() -> None:
    device = StageDevice("cpu")
    hidden = torch.randn(3, 8)
    assert device.to_host(hidden) is hidden and device.to_device(hidden) is hidden
    assert torch.equal(device.tensor([1, 2]), torch.tensor([1, 2])) and device.tensor([1]).device.type == "cpu"
    device.prepare_staging(544, 8, torch.float32)
    assert device.staging_bytes() == 0  # no pinned memory on CPU
    assert device.free_memory() > 0 and device.describe()["device"] == "cpu"


def test_kv_budget_is_free_memory_less_weights_and_headroom() -> None:
    headroom = activation_headroom_bytes(544, 4096, 14336, 128256, 32, 2)  # an 8B Llama's shape, bfloat16
    assert headroom == 544 * (4 * 4096 + 3 * 14336) * 2 + 3 * 32 * 128256 * 4 + GPU_RUNTIME_BYTES
    budget = device_kv_budget(80 * GiB, 0.9, 16 * GiB, headroom)
    assert budget == int(80 * GiB * 0.9) - 16 * GiB - headroom
    assert device_kv_budget(10 * GiB, 0.9, 16 * GiB, headroom) == 0  # weights alone do not fit
    with pytest.raises(ValueError, match="fraction"):
        device_kv_budget(GiB, 0.0, 0, 0)


def test_kv_slots_from_a_given_free_memory_figure() -> None:
    per_token = kv_bytes_per_token(32, 8, 128, 2)  # 128 KiB a token
    headroom = activation_headroom_bytes(544, 4096, 14336, 128256, 64, 2)
    budget = device_kv_budget(80 * GiB, 0.9, 16 * GiB, headroom)
    plan = plan_kv_slots(64, 8192, per_token, budget)
    assert plan.slots == budget // (8192 * per_token) < 64  # fewer than wanted fit beside the weights
    assert plan_kv_slots(8, 8192, per_token, budget).slots == 8
    with pytest.raises(ValueError, match="KV cache"):
        plan_kv_slots(8, 8192, per_token, device_kv_budget(17 * GiB, 0.9, 16 * GiB, headroom))


def test_a_cpu_worker_plans_its_gpu_slots_from_a_given_figure(tiny_dir: Path) -> None:
    spec = split_layers(6, 1)[0]
    worker = StageWorker(StageConfig(str(tiny_dir), spec, "float32", 64, 128, 1, max_step_tokens=64))
    config, dtype = load_config(tiny_dir), torch.float32
    kv_heads, head_dim = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    per_slot = 128 * kv_bytes_per_token(6, kv_heads, head_dim, 4)
    roomy = worker._device_kv_slots(8 * GiB, config, kv_heads, head_dim, dtype)
    assert roomy == 64
    weights = sum(p.numel() * p.element_size() for p in worker.model.parameters())
    headroom = activation_headroom_bytes(64, config.hidden_size, config.intermediate_size, config.vocab_size, 64, 4)
    tight = weights + headroom + 5 * per_slot
    with pytest.raises(ValueError, match="KV cache"):  # 0.9 of it leaves out more than the 5 slots
        worker._device_kv_slots(tight, config, kv_heads, head_dim, dtype)
    worker.config = StageConfig(str(tiny_dir), spec, "float32", 64, 128, 1, max_step_tokens=64, gpu_memory_fraction=1)
    assert worker._device_kv_slots(tight, config, kv_heads, head_dim, dtype) == 5
    with pytest.raises(ValueError, match="KV cache"):
        worker._device_kv_slots(weights, config, kv_heads, head_dim, dtype)


def test_gpu_stages_plan_the_wanted_slots_and_cpu_stages_plan_host_memory(tiny_dir: Path) -> None:
    gpu = Settings().pipeline.model_copy(update={"stage_resources": {"GPU": 1.0, "CPU": 2.0}, "max_num_seqs": 4096})
    config, stages = load_config(tiny_dir), split_layers(6, 2)
    assert stages_on_gpu(gpu) and _plan_kv(config, stages, "bfloat16", 1_000_000, gpu).slots == 4096
    forced_cpu = gpu.model_copy(update={"device": "cpu"})
    assert not stages_on_gpu(forced_cpu)
    with pytest.raises(ValueError, match="KV cache"):  # a million-token context on host memory
        _plan_kv(config, stages, "bfloat16", 1_000_000_000, forced_cpu)


def test_a_stage_recipe_carries_the_device_settings(tiny_dir: Path) -> None:
    pipeline = Settings().pipeline.model_copy(update={"stage_resources": {"GPU": 1.0, "CPU": 2.0}})
    recipe = stage_recipe("p", split_layers(6, 1)[0], tiny_dir, "bfloat16", 128, pipeline, 4, "none")
    config = recipe.config
    assert (config.device, config.bundle_gpus, config.cuda_graphs) == ("auto", 1.0, True)
    assert config.max_step_tokens == pipeline.max_batch_size + pipeline.prefill_chunk
    assert recipe.options["num_gpus"] == 1.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback of a machine without CUDA")
def test_a_worker_in_a_gpu_bundle_without_cuda_computes_on_cpu(tiny_dir: Path) -> None:
    spec = split_layers(6, 1)[0]
    worker = StageWorker(StageConfig(str(tiny_dir), spec, "float32", 2, 64, 1, device="auto", bundle_gpus=1.0))
    assert worker.describe().extra["device"] == "cpu" and worker.cache.device.type == "cpu"


def test_the_device_settings_are_validated() -> None:
    with pytest.raises(ValueError):
        Settings(pipeline={"device": "tpu"})
    with pytest.raises(ValueError):
        Settings(pipeline={"gpu_memory_fraction": 1.5})


@pytest.mark.gpu
@needs_cuda
def test_bfloat16_on_cuda_is_close_to_float32_on_cpu(tiny_dir: Path) -> None:
    """The first step's logits of a bfloat16 CUDA pipeline stay near CPU float32's (2 stages, hidden states
    through the pinned buffers)."""
    chunk = SeqChunk("s", 0, 0, (5, 17, 99, 3, 250), SamplingParams(temperature=0.0))
    logits = {}
    for device, dtype in (("cpu", "float32"), ("cuda", "bfloat16")):
        specs = split_layers(6, 2)
        workers = [
            StageWorker(StageConfig(str(tiny_dir), s, dtype, 2, 64, 1, device=device, max_step_tokens=8))  # type: ignore[arg-type]
            for s in specs
        ]
        hidden = workers[0].forward(StepBatch(0, (chunk,)))
        assert isinstance(hidden, torch.Tensor) and hidden.device.type == "cpu"  # links carry host tensors
        inner = workers[1]
        positions = torch.arange(5, device=inner.device.torch)
        view_out = inner.model(inner.device.to_device(hidden), positions, CausalAttention())
        logits[device] = inner.model.logits(view_out[-1:]).cpu()
    assert torch.allclose(logits["cuda"], logits["cpu"], atol=0.1, rtol=0.05)
    assert workers[1].describe().extra["device"].startswith("cuda")
