import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from serve_apps.engine.layer_split import head_balanced_weights, split_layers
from serve_apps.engine.stage_model import StageModel

SMOLLM2 = LlamaConfig(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    tie_word_embeddings=True,
)


@pytest.mark.parametrize("layers,stages", [(30, 1), (30, 2), (30, 3), (30, 7), (6, 6), (5, 2)])
def test_split_covers_every_layer_once_contiguously(layers: int, stages: int) -> None:
    specs = split_layers(layers, stages)
    assert [s.index for s in specs] == list(range(stages))
    assert specs[0].start == 0 and specs[-1].end == layers
    assert all(a.end == b.start for a, b in zip(specs, specs[1:], strict=False))
    assert all(s.num_layers >= 1 for s in specs)
    assert max(s.num_layers for s in specs) - min(s.num_layers for s in specs) <= 1
    assert specs[0].first and specs[-1].last and sum(s.first for s in specs) == sum(s.last for s in specs) == 1


def test_weighted_split_follows_weights() -> None:
    specs = split_layers(30, 2, weights=[2.0, 1.0])
    assert (specs[0].num_layers, specs[1].num_layers) == (20, 10)


@pytest.mark.parametrize("layers,stages", [(4, 5), (4, 0), (0, 1)])
def test_split_rejects_impossible_shapes(layers: int, stages: int) -> None:
    with pytest.raises(ValueError):
        split_layers(layers, stages)


@pytest.mark.parametrize("stages", [1, 2, 3])
def test_stage_parameters_on_meta_add_up_to_the_model(stages: int) -> None:
    with torch.device("meta"):
        full = sum(p.numel() for p in LlamaForCausalLM(SMOLLM2).parameters())
        parts = [sum(p.numel() for p in StageModel(SMOLLM2, spec).parameters()) for spec in split_layers(30, stages)]
    embedding = SMOLLM2.vocab_size * SMOLLM2.hidden_size
    # A tied lm_head is one tensor in the full model but a copy on the last stage.
    assert sum(parts) == full + embedding
    layer = (full - embedding - SMOLLM2.hidden_size) / 30
    for part, spec in zip(parts, split_layers(30, stages), strict=True):
        ends = embedding * (spec.first + spec.last) + SMOLLM2.hidden_size * spec.last
        assert part == pytest.approx(ends + layer * spec.num_layers)


def test_the_last_stage_gets_fewer_layers_for_its_lm_head() -> None:
    # SmolLM2's head is about 8 layers of work: three stages of 13, 12 and 5 + 8 layers.
    counts = [s.num_layers for s in split_layers(30, 3, head_balanced_weights(30, 3, 8.0))]
    assert counts == [13, 12, 5]
    assert [s.num_layers for s in split_layers(30, 1, head_balanced_weights(30, 1, 8.0))] == [30]
    # A head heavier than a stage's share still leaves the last stage one layer.
    assert [s.num_layers for s in split_layers(6, 3, head_balanced_weights(6, 3, 85.0))][-1] == 1
