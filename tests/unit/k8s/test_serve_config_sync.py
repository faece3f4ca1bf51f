"""RayService.spec.serveConfigV2 is configs/serve.yaml plus the k8s-only overrides, and no more."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from tests.unit.k8s.conftest import manifest
from tests.unit.k8s.crd_schema import REPO_ROOT

SERVE_CONFIG = REPO_ROOT / "configs" / "serve.yaml"

# The shape of configs/serve.yaml, to test the override logic independently of its values.
SAMPLE: dict[str, Any] = {
    "proxy_location": "EveryNode",
    "http_options": {"host": "127.0.0.1", "port": 8000},
    "applications": [
        {
            "name": "solanalm",
            "route_prefix": "/",
            "import_path": "serve_apps.builder:build_app",
            "args": {
                "model": {"served": ["smollm2-135m-instruct"]},
                "pipeline": {"num_stages": 2, "placement_strategy": "PACK"},
            },
        },
        {"name": "other", "import_path": "x:y", "args": {}},
    ],
}


def _differences(a: Any, b: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Paths where two parsed YAML trees differ; list indexes become "*"."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = a.keys() | b.keys()
        return [d for k in keys for d in _differences(a.get(k), b.get(k), (*path, k))]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for x, y in zip(a, b, strict=True) for d in _differences(x, y, (*path, "*"))]
    return [] if a == b else [path]


def _serve_yaml() -> dict[str, Any]:
    if not SERVE_CONFIG.exists():
        pytest.fail("configs/serve.yaml is missing: RayService.serveConfigV2 is rendered from it")
    return yaml.safe_load(SERVE_CONFIG.read_text())


def test_overrides_change_only_the_declared_paths(render: ModuleType) -> None:
    result = render.k8s_serve_config(SAMPLE)
    assert result["http_options"]["host"] == "0.0.0.0"
    assert result["applications"][0]["args"]["pipeline"]["placement_strategy"] == "SPREAD"
    assert result["applications"][1]["args"] == {}  # no pipeline: nothing is invented
    declared = {path for path, _ in render.K8S_SERVE_OVERRIDES}
    assert set(_differences(SAMPLE, result)) == declared
    assert SAMPLE["http_options"]["host"] == "127.0.0.1"  # the input is not mutated


def test_serve_config_v2_is_serve_yaml_with_the_overrides(render: ModuleType) -> None:
    serve_yaml = _serve_yaml()
    deployed = yaml.safe_load(manifest("rayservice.yaml")["spec"]["serveConfigV2"])
    assert deployed == render.k8s_serve_config(serve_yaml)
    declared = {path for path, _ in render.K8S_SERVE_OVERRIDES}
    assert set(_differences(serve_yaml, deployed)) <= declared


def test_serve_config_v2_binds_all_interfaces_and_spreads_stages() -> None:
    deployed = yaml.safe_load(manifest("rayservice.yaml")["spec"]["serveConfigV2"])
    assert deployed["http_options"]["host"] == "0.0.0.0"
    assert deployed["http_options"]["port"] == 8000
    for app in deployed["applications"]:
        if "pipeline" in app.get("args", {}):
            assert app["args"]["pipeline"]["placement_strategy"] == "SPREAD"


def test_generated_manifests_are_up_to_date(render: ModuleType) -> None:
    _serve_yaml()
    stale = render.stale_files(render.render_all())
    assert stale == [], "run: python k8s/render.py"


def test_stale_file_is_reported(render: ModuleType, tmp_path: Path) -> None:
    current, old, missing = tmp_path / "a.yaml", tmp_path / "b.yaml", tmp_path / "c.yaml"
    current.write_text("x: 1\n")
    old.write_text("x: 0\n")
    expected = {current: "x: 1\n", old: "x: 1\n", missing: "x: 1\n"}
    assert render.stale_files(expected) == [old, missing]


def test_serve_config_v2_is_a_literal_block() -> None:
    text = (REPO_ROOT / "k8s" / "rayservice.yaml").read_text()
    assert "  serveConfigV2: |\n" in text  # readable in `kubectl get -o yaml` and in review


def test_check_flag_fails_when_serve_config_changes(render: ModuleType, tmp_path: Path) -> None:
    _serve_yaml()
    assert render.main(["--check"]) == 0
    changed = tmp_path / "serve.yaml"
    changed.write_text(yaml.safe_dump({**_serve_yaml(), "proxy_location": "HeadOnly"}))
    assert render.main(["--check", "--serve-config", str(changed)]) == 1
