"""The Helm values files in k8s/values/, against the KubeRay v1.7.0 charts' default values."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from tests.unit.k8s.chart_values import (
    CHARTS,
    commented_default_missing,
    typed_values,
    unknown_keys,
)
from tests.unit.k8s.conftest import K8S_DIR
from tests.unit.k8s.crd_schema import StrictValidator, sub_schema

pytestmark = pytest.mark.usefixtures("kuberay_reference")


def _values(chart: str) -> dict[str, Any]:
    return yaml.safe_load((K8S_DIR / "values" / f"{chart}.yaml").read_text())


def _crd_errors(values: dict[str, Any]) -> list[str]:
    errors = []
    for path, value, crd_path in typed_values(values, "ray-cluster"):
        schema = sub_schema("RayCluster", "v1", *crd_path)
        validator = StrictValidator(schema)
        errors += [f"{path}: {e.message}" for e in validator.iter_errors(value)]
    return errors


def test_a_values_file_per_chart() -> None:
    assert {p.stem for p in (K8S_DIR / "values").glob("*.yaml")} == set(CHARTS)


@pytest.mark.parametrize("chart", CHARTS)
def test_every_key_exists_in_the_chart_defaults(chart: str) -> None:
    assert unknown_keys(_values(chart), chart) == []


@pytest.mark.parametrize("chart", CHARTS)
def test_commented_defaults_are_still_documented_by_the_chart(chart: str) -> None:
    assert commented_default_missing(chart) == []


def test_ray_cluster_values_match_the_raycluster_crd() -> None:
    typed = {path for path, *_ in typed_values(_values("ray-cluster"), "ray-cluster")}
    assert {"head.resources", "additionalWorkerGroups.gpu-group.tolerations"} <= typed
    assert _crd_errors(_values("ray-cluster")) == []


@pytest.mark.parametrize(
    ("chart", "change", "expected"),
    [
        ("ray-cluster", lambda v: v["head"].update(rayStartParam={}), "head.rayStartParam"),
        ("ray-cluster", lambda v: v.update(workers={}), "workers"),
        (
            "ray-cluster",
            lambda v: v["additionalWorkerGroups"]["gpu-group"].update(gpus=1),
            "additionalWorkerGroups.gpu-group.gpus",
        ),
        ("ray-cluster", lambda v: v["head"]["autoscalerOptions"].update(version="v2"), "version"),
        ("ray-cluster", lambda v: v["worker"].update(labels=["a"]), "worker.labels: a map"),
        ("ray-cluster", lambda v: v["head"].update(resources="2"), "head.resources: a map"),
        ("kuberay-operator", lambda v: v["metrics"]["serviceMonitor"].update(port=1), "port"),
        ("kuberay-operator", lambda v: v["image"].update(digest="sha256:0"), "image.digest"),
    ],
    ids=[
        "typo",
        "unknown-top-level",
        "unknown-in-named-group",
        "undocumented-autoscaler-field",
        "list-for-map",
        "scalar-for-map",
        "operator-unknown",
        "operator-image",
    ],
)
def test_unknown_or_mistyped_key_is_rejected(chart: str, change: Any, expected: str) -> None:
    values = copy.deepcopy(_values(chart))
    change(values)
    assert any(expected in problem for problem in unknown_keys(values, chart))


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda v: v["head"]["rayStartParams"].update({"num-cpus": 0}), "0 is not of type"),
        (lambda v: v["worker"].update(minReplicas="1"), "'1' is not of type"),
        (
            lambda v: v["additionalWorkerGroups"]["gpu-group"]["tolerations"][0].update(efect="x"),
            "'efect' was unexpected",
        ),
        (lambda v: v["common"]["containerEnv"][0].update(valu="x"), "'valu' was unexpected"),
        (lambda v: v["worker"]["ports"].append({"containerPort": 8080}), "duplicate entry"),
    ],
    ids=["int-ray-start-param", "string-replicas", "typo-in-toleration", "typo-in-env", "dup-port"],
)
def test_kubernetes_typed_values_are_checked_by_the_crd(change: Any, expected: str) -> None:
    values = copy.deepcopy(_values("ray-cluster"))
    change(values)
    assert any(expected in error for error in _crd_errors(values))


def test_ray_cluster_values_mirror_the_shared_cluster_spec(cluster_spec: dict[str, Any]) -> None:
    """The Helm cluster and the RayService/RayJob clusters have the same groups and sizes."""
    values = _values("ray-cluster")
    head, workers = cluster_spec["headGroupSpec"], cluster_spec["workerGroupSpecs"]
    groups = {values["worker"]["groupName"]: values["worker"], **values["additionalWorkerGroups"]}
    assert set(groups) == {g["groupName"] for g in workers}
    assert values["head"]["rayStartParams"] == head["rayStartParams"]
    assert values["head"]["labels"] == head["labels"]
    assert values["head"]["rayVersion"] == cluster_spec["rayVersion"]
    for group in workers:
        helm = groups[group["groupName"]]
        container = group["template"]["spec"]["containers"][0]
        for key in ("replicas", "minReplicas", "maxReplicas", "labels", "rayStartParams"):
            assert helm[key] == group[key], (group["groupName"], key)
        assert helm["resources"] == container["resources"]
        assert helm.get("tolerations", []) == group["template"]["spec"].get("tolerations", [])
        assert helm.get("nodeSelector", {}) == group["template"]["spec"].get("nodeSelector", {})
        assert helm["restartPolicy"] == group["template"]["spec"]["restartPolicy"]
    assert values["head"]["restartPolicy"] == head["template"]["spec"]["restartPolicy"]


def test_ray_cluster_values_turn_on_token_auth_from_a_secret() -> None:
    """The chart has no authOptions: every Ray container and the autoscaler get KubeRay's two variables."""
    values = _values("ray-cluster")
    for env in (values["common"]["containerEnv"], values["head"]["autoscalerOptions"]["env"]):
        by_name = {e["name"]: e for e in env}
        assert by_name["RAY_AUTH_MODE"]["value"] == "token"
        ref = by_name["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "solanalm-cluster-ray-auth", "key": "auth_token"}  # KubeRay's key name


def test_ray_cluster_values_give_only_the_head_the_ledger_url_from_the_secret(render: Any) -> None:
    values = _values("ray-cluster")
    head = {e["name"]: e for e in values["head"]["containerEnv"]}
    ref = head["SOLANALM_PAYMENTS__DATABASE_URL"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": render.LEDGER_SECRET, "key": render.LEDGER_SECRET_KEY, "optional": False}
    shared = [values["common"]["containerEnv"], values["worker"].get("containerEnv", [])]
    shared += [g.get("containerEnv", []) for g in values["additionalWorkerGroups"].values()]
    assert not [e for env in shared for e in env if e["name"].startswith("SOLANALM_PAYMENTS__")]
