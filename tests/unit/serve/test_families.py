"""Every family the sharded engine serves, as a tiny random model of its real config shape (float32):
greedy output through 1, 2 and 3 stages equals transformers' own `generate` token for token, KV-cache decode
equals a full forward past the sliding window, low-bit copies keep working, and an unknown architecture is
refused at start naming the supported ones."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from cluster.models import tiny
from cluster.models.tiny import TINY_WINDOW
from serve_apps.engine.architectures import SUPPORTED_MODEL_TYPES, UnsupportedArchitecture, architecture_of
from serve_apps.engine.kv_cache import BatchView, Row, SlotKVCache
from serve_apps.engine.layer_split import split_layers
from serve_apps.engine.quant import dequantize, quantize
from serve_apps.engine.stage_model import build_stage, load_config
from serve_apps.engine.stage_worker import StageConfig, StageWorker
from tests.unit.serve.test_stage_worker import run_pipeline

FAMILIES = ("llama", "llama3", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3")
WINDOWED = ("mistral", "gemma2", "gemma3", "phi3")
VOCAB = 256
LAYERS = 4
PROMPT = [5, 17, 99, 3, 250, 8, 41, 77, 12, 200, 33]  # longer than TINY_WINDOW: the prefill crosses the window
NEW_TOKENS = 10


def family_config(family: str) -> PretrainedConfig:
    config: PretrainedConfig = getattr(tiny, f"tiny_{family}_config")(vocab_size=VOCAB, num_layers=LAYERS)
    return config


def save_family(family: str, path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(family)).to(torch.float32)
    with torch.no_grad():  # norms and biases start at 0 or 1: make them matter, so a wrong form shows
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                param.normal_(0.0, 0.3)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=FAMILIES)
def family_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    family = str(request.param)
    return family, save_family(family, tmp_path_factory.mktemp(f"tiny-{family}"))


def workers(model_dir: Path, stages: int, quant: str = "none", slots: int = 4) -> list[StageWorker]:
    return [
        StageWorker(StageConfig(str(model_dir), spec, "float32", slots, 64, 1, "", quant, 8))  # type: ignore[arg-type]
        for spec in split_layers(LAYERS, stages)
    ]


def reference(model_dir: Path, prompt: list[int], new_tokens: int) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0
    )
    return out[0, len(prompt) :].tolist()


def test_every_family_resolves_its_switches() -> None:
    arch = {family: architecture_of(family_config(family)) for family in FAMILIES}
    assert arch["qwen2"].qkv_bias and not arch["qwen2"].o_bias
    assert arch["qwen3"].qk_norm and arch["qwen3"].head_dim == 32
    assert {kind.sliding_window for kind in arch["mistral"].layers} == {TINY_WINDOW}
    assert [kind.sliding_window for kind in arch["gemma2"].layers] == [TINY_WINDOW, None, TINY_WINDOW, None]
    assert arch["gemma2"].attn_softcap == 5.0 and arch["gemma2"].final_softcap == 3.0
    assert arch["gemma2"].scaling == 24**-0.5 and arch["gemma2"].activation == "gelu_tanh"
    assert [kind.rope for kind in arch["gemma3"].layers] == ["sliding_attention"] * 2 + ["full_attention"] * 1 + [
        "sliding_attention"
    ]
    assert arch["phi3"].family.fused_checkpoint
    assert arch["llama3"].rope_parameters("global")["rope_type"] == "llama3"


@pytest.mark.parametrize("stages", [1, 2, 3])
def test_greedy_through_stages_equals_transformers_generate(family_dir: tuple[str, Path], stages: int) -> None:
    family, path = family_dir
    expected = reference(path, PROMPT, NEW_TOKENS)
    assert run_pipeline(workers(path, stages), PROMPT, NEW_TOKENS) == expected, family


def test_chunked_prefill_across_the_window_matches(family_dir: tuple[str, Path]) -> None:
    _, path = family_dir
    assert run_pipeline(workers(path, 2), PROMPT, 6, chunk=3) == run_pipeline(workers(path, 2), PROMPT, 6)


def test_kv_cache_decode_equals_full_forward_past_the_window(family_dir: tuple[str, Path]) -> None:
    """Logits of a prefill then one-token decode steps (the serving path, two sequences batched at different
    positions) equal the cache-free forward's and transformers' at every position, well past the window."""
    family, path = family_dir
    model = build_stage(path, split_layers(LAYERS, 1)[0], torch.float32)
    arch = model.arch
    tokens = torch.randint(0, VOCAB, (3 * TINY_WINDOW,), generator=torch.Generator().manual_seed(1))
    other = torch.randint(0, VOCAB, (3 * TINY_WINDOW,), generator=torch.Generator().manual_seed(2))
    cache = SlotKVCache(range(LAYERS), 2, 64, arch.num_kv_heads, arch.head_dim, torch.float32)
    prefill = 5
    with torch.inference_mode():
        full = model.logits(model.forward_full(tokens))
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)(tokens.view(1, -1)).logits[0]
        torch.testing.assert_close(full, hf, atol=1e-4, rtol=1e-4, msg=family)
        full_other = model.logits(model.forward_full(other))
        view = BatchView.of([Row(0, 0, prefill), Row(1, 0, prefill + 3)])
        hidden = model(torch.cat([tokens[:prefill], other[: prefill + 3]]), cache.bind(view).positions, cache)
        got = [model.logits(hidden[view.last_tokens()[0]].view(1, -1))[0]]
        for pos in range(prefill, len(tokens) - 3):
            view = BatchView.of([Row(0, pos, 1), Row(1, pos + 3, 1)])
            step = model(torch.stack([tokens[pos], other[pos + 3]]), cache.bind(view).positions, cache)
            got.append(model.logits(step[:1])[0])
            torch.testing.assert_close(model.logits(step[1:])[0], full_other[pos + 3], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.stack(got), full[prefill - 1 : len(tokens) - 3], atol=1e-4, rtol=1e-4)


def test_low_bit_copies_decode_the_same_tokens_as_dense(family_dir: tuple[str, Path], tmp_path: Path) -> None:
    """Projections made of Q4_1 blocks (as a GGUF's): the int4 copies, fused shapes and biases added after
    the projection, decode what the dense weights do."""
    family, path = family_dir
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("proj.weight"):
                param.copy_(dequantize(quantize(param, "int4"), param.shape[1]))  # type: ignore[arg-type]
    model.save_pretrained(tmp_path)
    quantized = workers(tmp_path, 2, "int4")
    assert quantized[0].model.low_bit_bytes() > 0
    assert run_pipeline(quantized, PROMPT, 8) == run_pipeline(workers(tmp_path, 2), PROMPT, 8), family


def write_config(path: Path, **fields: object) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(fields))
    return path


@pytest.mark.parametrize(
    "fields",
    [
        {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]},  # known to transformers, not to the stages
        {"model_type": "no-such-family-2026"},  # known to neither
        {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"]},  # the multimodal wrapper
    ],
)
def test_unknown_architecture_is_refused_naming_the_supported_ones(tmp_path: Path, fields: dict[str, object]) -> None:
    path = write_config(tmp_path / "model", **fields)
    with pytest.raises(UnsupportedArchitecture) as refused:
        load_config(path)
    message = str(refused.value)
    assert str(fields["model_type"]) in message
    assert all(model_type in message for model_type in SUPPORTED_MODEL_TYPES), message
    with pytest.raises(ValueError, match="supported"):  # the stage refuses at start, before reading weights
        StageWorker(StageConfig(str(path), split_layers(2, 1)[0], "float32", 1, 16, 1))


def test_unsupported_rope_type_is_refused() -> None:
    config = family_config("llama")
    config.rope_parameters = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    with pytest.raises(UnsupportedArchitecture, match="rope type 'dynamic'"):
        architecture_of(config)


@pytest.mark.parametrize("family", FAMILIES)
def test_planned_layer_bytes_are_what_a_stage_of_the_family_holds(family: str) -> None:
    """The placement's per-layer bytes (model_cost, from transformers' own layer) equal the fused stage's."""
    from cluster.network.model_cost import model_cost_from_config
    from serve_apps.engine.stage_model import StageModel

    config = family_config(family)
    cost = model_cost_from_config(config, torch.float32)
    with torch.device("meta"):
        stage = StageModel(config, split_layers(LAYERS, 1)[0])
    per_layer = {sum(p.numel() for p in layer.parameters()) * 4 for layer in stage.layers}
    assert per_layer == {cost.layer_bytes}
