"""Per-layer bytes of every family in cluster.models.tiny: layer 0 of the family's own model (biases, fused
projections, extra norms), not a Llama layer of the same shape."""

import inspect

import pytest
import torch
from transformers import AutoModelForCausalLM

from cluster.models import tiny
from cluster.network.model_cost import model_cost_from_config

FACTORIES = {
    name: factory
    for name, factory in inspect.getmembers(tiny, inspect.isfunction)
    if name.startswith("tiny_") and name.endswith("_config")
}


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_layer_bytes_are_the_familys_own_layer(name: str) -> None:
    config = FACTORIES[name](vocab_size=256)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layer_params = sum(p.numel() for p in model.model.layers[0].parameters())
    cost = model_cost_from_config(config)
    assert cost.layer_bytes == layer_params * 4 and cost.num_layers == config.num_hidden_layers
