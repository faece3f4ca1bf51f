"""`up` without a registry plan: a model whose layers do not fit its stages' memory gets more stages."""

import pytest
import typer

import cluster.cli as cli
from cluster.config import Settings
from cluster.network.placement import ModelCost

MIB = 2**20
COST = ModelCost(num_layers=30, layer_bytes=100 * MIB, embed_bytes=50 * MIB, head_bytes=60 * MIB)


def _settings(memory_mib: int) -> Settings:
    pipeline = {"num_stages": 2, "stage_resources": {"CPU": 1, "memory": memory_mib * MIB}}
    return Settings(pipeline=pipeline, network={"placement": {"max_stages": 6, "memory_headroom": 0.0}})


def test_the_bundle_memory_decides_the_stage_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "_weight_costs", lambda settings: {"m": COST})
    placed = cli._fit_to_memory(_settings(1000))
    layers = placed.pipeline.placements["m"].stage_layers
    assert len(layers) == 4 and sum(layers) == 30 and placed.pipeline.placements["m"].node_ids is None


def test_a_model_no_allowed_stage_count_holds_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "_weight_costs", lambda settings: {"m": COST})
    with pytest.raises(typer.Exit):
        cli._fit_to_memory(_settings(300))
