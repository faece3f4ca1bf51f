"""Layer costs measured on the meta device agree with the whole model and with a built stage."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cluster.network.model_cost import model_cost_from_config
from cluster.network.placement import NodeCapacity, plan_stages, stage_memory_bytes
from serve_apps.engine.layer_split import split_layers
from serve_apps.engine.stage_model import StageModel

CONFIG = LlamaConfig(
    vocab_size=1000,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=False,
)


def param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def test_cost_adds_up_to_the_whole_model() -> None:
    cost = model_cost_from_config(CONFIG, torch.bfloat16, kv_tokens=128)
    with torch.device("meta"):
        model = LlamaForCausalLM(CONFIG)
    assert cost.embed_bytes + 6 * cost.layer_bytes + cost.head_bytes == param_bytes(model) // 2  # fp32 -> bf16
    assert cost.kv_bytes_per_layer == 2 * 2 * 16 * 128 * 2
    assert cost.layer_flops_per_token == 2 * cost.layer_bytes / 2


def test_planned_stage_memory_matches_stage_models_on_meta() -> None:
    cost = model_cost_from_config(CONFIG, torch.float32)
    nodes = [NodeCapacity("a", 2**30, 2.0), NodeCapacity("b", 2**30, 1.0)]
    plan = plan_stages(cost, nodes, max_stages=2, min_stage_gain=0.0)
    specs = split_layers(cost.num_layers, len(plan.stages), weights=plan.weights)
    with torch.device("meta"):
        built = [param_bytes(StageModel(CONFIG, spec)) for spec in specs]
    assert built == stage_memory_bytes(plan, cost)


@pytest.mark.parametrize("quant", ["int4", "int8"])
def test_planned_memory_counts_the_packed_low_bit_copies_a_stage_really_holds(quant: str) -> None:
    """Per layer and for the lm_head, the planner's packed bytes equal what quantizing a real stage allocates."""
    config = LlamaConfig(**{**CONFIG.to_dict(), "hidden_size": 64, "intermediate_size": 96})
    dense = model_cost_from_config(config, torch.bfloat16)
    cost = model_cost_from_config(config, torch.bfloat16, weight_quant=quant)  # type: ignore[arg-type]
    spec = split_layers(config.num_hidden_layers, 1)[0]
    stage = StageModel(config, spec).to(torch.bfloat16)
    for param in stage.parameters():
        torch.nn.init.normal_(param)
    stage.quantize(quant, 8)  # type: ignore[arg-type]
    packed_layers = (cost.layer_bytes - dense.layer_bytes) * config.num_hidden_layers
    assert packed_layers + cost.head_bytes - dense.head_bytes == stage.low_bit_bytes() > 0
