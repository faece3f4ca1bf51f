"""A planned placement in the settings: validated, turned into pinned bundles, and into exact layer ranges."""

import pytest
from pydantic import ValidationError

from cluster.config import load_settings
from cluster.config.serving import PipelineSection, StagePlacement
from cluster.models.tiny import tiny_llama_config
from serve_apps.builder import pipeline_deployment, stage_bundles, stage_label_selectors
from serve_apps.server.pipeline_server import _stage_specs


def planned(layers: list[int], nodes: list[str] | None = None) -> PipelineSection:
    return PipelineSection(num_stages=3, placements={"m": StagePlacement(stage_layers=layers, node_ids=nodes)})


def test_placement_rejects_empty_stages_and_a_node_count_mismatch() -> None:
    with pytest.raises(ValidationError, match="at least one layer"):
        StagePlacement(stage_layers=[4, 0])
    with pytest.raises(ValidationError, match="one node id per stage"):
        StagePlacement(stage_layers=[4, 2], node_ids=["a"])
    with pytest.raises(ValidationError):
        StagePlacement(stage_layers=[])


def test_bundles_follow_the_plan_and_other_models_keep_num_stages() -> None:
    pipeline = planned([4, 2], ["node-a", "node-b"])
    assert stage_bundles(pipeline, "m") == [{"CPU": 1.0}, {"CPU": 1.0}]
    assert len(stage_bundles(pipeline, "other")) == 3
    assert stage_label_selectors("m", pipeline, "ray.io/node-id") == [
        {"ray.io/node-id": "node-a"},
        {"ray.io/node-id": "node-b"},
    ]


def test_a_pinned_deployment_carries_label_selectors_and_spread() -> None:
    config = pipeline_deployment("m", planned([4, 2], ["node-a", "node-b"]))._deployment_config
    replica = pipeline_deployment("m", planned([4, 2], ["node-a", "node-b"]))._replica_config
    assert replica.placement_group_bundle_label_selector == [{"ray.io/node-id": "node-a"}, {"ray.io/node-id": "node-b"}]
    assert replica.placement_group_strategy == "SPREAD" and config.graceful_shutdown_timeout_s == 30.0
    unpinned = pipeline_deployment("m", planned([4, 2]))._replica_config
    assert unpinned.placement_group_bundle_label_selector is None
    assert unpinned.placement_group_strategy == "PACK" and len(unpinned.placement_group_bundles) == 2


def test_planned_layer_counts_become_exact_ranges() -> None:
    settings = load_settings(pipeline={"num_stages": 2, "placements": {"m": {"stage_layers": [5, 1]}}})
    config = tiny_llama_config(num_layers=6)
    assert [(s.start, s.end, s.first, s.last) for s in _stage_specs("m", config, settings)] == [
        (0, 5, True, False),
        (5, 6, False, True),
    ]
    # Unplanned: equal work, the tiny model's large head leaves the last stage a single layer.
    assert [(s.start, s.end) for s in _stage_specs("other", config, settings)] == [(0, 5), (5, 6)]
    with pytest.raises(ValueError, match="sum to 7, the model has 6"):
        _stage_specs("m", config, load_settings(pipeline={"placements": {"m": {"stage_layers": [5, 2]}}}))


def test_each_pipeline_is_built_with_only_its_own_placement() -> None:
    from serve_apps.builder import _own_placement

    settings = load_settings(pipeline={"placements": {"a": {"stage_layers": [3, 3]}, "b": {"stage_layers": [6]}}})
    own = _own_placement(settings, "a")
    assert list(own.pipeline.placements) == ["a"] and list(settings.pipeline.placements) == ["a", "b"]
    assert list(_own_placement(settings, "c").pipeline.placements) == []


def test_with_pinned_stages_the_gateway_stays_on_the_head(repo_root, model_cache_dir) -> None:  # type: ignore[no-untyped-def]
    from serve_apps.builder import build_app

    args = {
        "model": {
            "served": ["tiny-llama"],
            "catalogue": str(repo_root / "configs/models.yaml"),
            "cache_dir": str(model_cache_dir),
        },
        "payments": {"enabled": False},
    }
    plain = build_app(args)
    assert "resources" not in (plain._bound_deployment.ray_actor_options or {})
    args["pipeline"] = {"placements": {"tiny-llama": {"stage_layers": [5, 1], "node_ids": ["a", "b"]}}}
    pinned = build_app(args)
    assert (pinned._bound_deployment.ray_actor_options or {})["resources"] == {"node:__internal_head__": 0.001}
    assert pinned._bound_deployment._deployment_config.graceful_shutdown_timeout_s == 600.0  # request_timeout_s
