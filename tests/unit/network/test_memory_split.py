"""Memory-fitting split: stage count from per-layer bytes and each stage's memory, given figures only."""

import pytest

from cluster.config.network import PlacementSection
from cluster.network.placement import ModelCost, PlacementError, memory_fitted_split
from cluster.network.serving_plan import memory_fitted_layers

MIB = 2**20
# 30 layers of 100 MiB, a 50 MiB embedding and a 60 MiB head: 3110 MiB in all.
COST = ModelCost(num_layers=30, layer_bytes=100 * MIB, embed_bytes=50 * MIB, head_bytes=60 * MIB)


def test_a_model_that_fits_one_stage_stays_one_stage() -> None:
    assert memory_fitted_split(COST, 4096 * MIB, headroom=0.0) == [30]


def test_stage_count_grows_until_every_stage_holds_its_share() -> None:
    # 1200 MiB a stage, 20% headroom: 960 MiB usable; 9 layers beside the embedding, 9 beside the head, 9 alone.
    layers = memory_fitted_split(COST, 1200 * MIB, headroom=0.2)
    assert len(layers) == 4 and sum(layers) == 30
    caps = [(960 - 50) // 100, 960 // 100, 960 // 100, (960 - 60) // 100]
    assert all(count <= cap for count, cap in zip(layers, caps, strict=True))


def test_never_more_layers_than_fit_and_spread_evenly() -> None:
    layers = memory_fitted_split(COST, 1500 * MIB, min_stages=3, headroom=0.0)
    # 1500 MiB: 14 layers with the embedding, 15 alone, 14 with the head; 30 spread evenly over 3.
    assert layers == [10, 10, 10]
    tight = ModelCost(num_layers=10, layer_bytes=100 * MIB, embed_bytes=400 * MIB, head_bytes=0)
    assert memory_fitted_split(tight, 700 * MIB, min_stages=2, headroom=0.0) == [3, 7]


def test_the_requested_stage_count_is_a_floor() -> None:
    assert len(memory_fitted_split(COST, 8192 * MIB, min_stages=3, headroom=0.0)) == 3


def test_refused_with_what_was_needed_when_max_stages_cannot_hold_it() -> None:
    with pytest.raises(PlacementError, match=r"needs 3\.04 GiB .*30 layers of 100\.0 MiB.*2 stages of.*max_stages"):
        memory_fitted_split(COST, 1000 * MIB, max_stages=2, headroom=0.0)


def test_a_stage_too_small_for_one_layer_beside_the_embedding_is_refused() -> None:
    with pytest.raises(PlacementError, match="hold at most"):
        memory_fitted_split(COST, 120 * MIB, max_stages=8, headroom=0.0)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(PlacementError):
        memory_fitted_split(COST, 1000 * MIB, min_stages=3, max_stages=2)
    with pytest.raises(PlacementError, match="no layers"):
        memory_fitted_split(ModelCost(0, 1, 1, 1), 1000 * MIB)


def test_models_that_fit_keep_the_engine_split_unless_memory_was_set() -> None:
    section = PlacementSection(max_stages=8, memory_headroom=0.0)
    small = ModelCost(num_layers=6, layer_bytes=MIB, embed_bytes=MIB, head_bytes=MIB)
    costs = {"big": COST, "small": small}
    fitted = memory_fitted_layers(costs, 2, 1000 * MIB, section)
    assert list(fitted) == ["big"] and sum(fitted["big"]) == 30 and len(fitted["big"]) == 4
    assert memory_fitted_layers(costs, 2, 1000 * MIB, section, explicit_memory=True)["small"] == [3, 3]


def test_the_refusal_names_the_model() -> None:
    with pytest.raises(PlacementError, match="^big: "):
        memory_fitted_layers({"big": COST}, 1, 500 * MIB, PlacementSection(max_stages=2))
