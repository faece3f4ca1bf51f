"""The KubeRay manifests and monitors under k8s/, against the v1.7.0 CRDs and each other."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import pytest

from tests.unit.k8s.conftest import K8S_DIR, KUBERAY_MANIFESTS, MONITORING_DIR, manifest
from tests.unit.k8s.crd_schema import (
    CRD_FILES,
    ManifestError,
    cluster_spec_problems,
    iter_errors,
    load_yaml_documents,
    strict_schema,
    validate_manifest,
)

CLUSTER_FIELD = {"RayService": "rayClusterConfig", "RayJob": "rayClusterSpec"}
PROVIDER_LABELS = ("solanalm.io/wallet", "solanalm.io/region", "solanalm.io/hardware")
GPU = "nvidia.com/gpu"

# Prometheus Operator (monitoring.coreos.com/v1) is not in ../shared: this checks only the fields
# the project uses, strictly, not the official CRD.
_ENDPOINT = {
    "type": "object",
    "required": ["port"],
    "additionalProperties": False,
    "properties": {
        "port": {"type": "string", "minLength": 1},
        "path": {"type": "string", "pattern": "^/"},
        "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
        "relabelings": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "sourceLabels": {"type": "array", "items": {"type": "string"}},
                    "targetLabel": {"type": "string"},
                },
            },
        },
    },
}
_LABEL_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "minProperties": 1,
    "properties": {"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}},
}

pytestmark = pytest.mark.usefixtures("kuberay_reference")


def _monitor_schema(kind: str, endpoints_field: str) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": kind},
            "metadata": {
                "type": "object",
                "required": ["name"],
                "additionalProperties": False,
                "properties": {
                    "name": {"type": "string"},
                    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                },
            },
            "spec": {
                "type": "object",
                "required": ["selector", endpoints_field],
                "additionalProperties": False,
                "properties": {
                    "jobLabel": {"type": "string"},
                    "selector": _LABEL_SELECTOR,
                    endpoints_field: {"type": "array", "minItems": 1, "items": _ENDPOINT},
                },
            },
        },
    }


MONITOR_SCHEMAS = {
    "PodMonitor": _monitor_schema("PodMonitor", "podMetricsEndpoints"),
    "ServiceMonitor": _monitor_schema("ServiceMonitor", "endpoints"),
}


def _monitor_errors(doc: dict[str, Any]) -> list[str]:
    schema = MONITOR_SCHEMAS.get(doc.get("kind", ""))
    if schema is None:
        return [f"kind {doc.get('kind')!r} is not a Prometheus Operator monitor"]
    return [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(doc)]


def _cluster(name: str) -> dict[str, Any]:
    doc = manifest(name)
    return doc["spec"][CLUSTER_FIELD[doc["kind"]]]


def _ray_container(group: dict[str, Any]) -> dict[str, Any]:
    return group["template"]["spec"]["containers"][0]


def _monitoring_docs() -> list[dict[str, Any]]:
    return [doc for path in sorted(MONITORING_DIR.glob("*.yaml")) for doc in load_yaml_documents(path)]


# ---- every file is covered --------------------------------------------------------------------


def test_every_manifest_file_is_checked_here() -> None:
    kinds = {p.name: {d["kind"] for d in load_yaml_documents(p)} for p in K8S_DIR.glob("*.yaml")}
    assert set(kinds) == set(KUBERAY_MANIFESTS)
    assert all(k <= set(CRD_FILES) for k in kinds.values())
    assert {d["kind"] for d in _monitoring_docs()} <= set(MONITOR_SCHEMAS)


# ---- the KubeRay custom resources -------------------------------------------------------------


@pytest.mark.parametrize("name", KUBERAY_MANIFESTS)
def test_manifest_matches_its_kuberay_crd(name: str) -> None:
    assert list(iter_errors(manifest(name))) == []


@pytest.mark.parametrize("name", KUBERAY_MANIFESTS)
def test_cluster_passes_kuberay_operator_checks(name: str) -> None:
    assert cluster_spec_problems(_cluster(name)) == []


def test_head_has_no_gpu_and_runs_no_ray_work() -> None:
    head = _cluster("rayservice.yaml")["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert head["rayStartParams"]["num-cpus"] == "0"
    resources = _ray_container(head)["resources"]
    assert GPU not in resources.get("limits", {}) and GPU not in resources.get("requests", {})
    assert "nodeSelector" not in head["template"]["spec"]


def test_gpu_and_cpu_worker_groups_autoscale() -> None:
    spec = _cluster("rayservice.yaml")
    assert spec["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu-group", "gpu-group"}
    for group in groups.values():
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert group["maxReplicas"] > group["minReplicas"]
    gpu_pod = groups["gpu-group"]["template"]["spec"]
    assert _ray_container(groups["gpu-group"])["resources"]["limits"][GPU] == "1"
    assert gpu_pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in gpu_pod["tolerations"]
    assert GPU not in _ray_container(groups["cpu-group"])["resources"]["limits"]
    assert _ray_container(groups["gpu-group"])["image"].endswith("-gpu")
    assert _ray_container(groups["cpu-group"])["image"].endswith("-cpu")


def test_every_group_carries_provider_labels_and_exports_metrics_on_8080() -> None:
    spec = _cluster("rayservice.yaml")
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        assert set(PROVIDER_LABELS) <= set(group["labels"])
        assert group["rayStartParams"]["metrics-export-port"] == "8080"
        ports = {p["name"]: p["containerPort"] for p in _ray_container(group)["ports"]}
        assert ports["metrics"] == 8080
    head_ports = {p["name"]: p["containerPort"] for p in _ray_container(spec["headGroupSpec"])["ports"]}
    assert head_ports | {"gcs": 6379, "dashboard": 8265, "serve": 8000} == head_ports


def test_every_resource_shares_one_cluster_spec(cluster_spec: dict[str, Any], render: ModuleType) -> None:
    assert _cluster("rayservice.yaml") == render.with_ledger(cluster_spec)  # the ledger Secret (test_ledger.py)
    for name in ("rayjob-data-parallel.yaml", "rayjob-federated.yaml"):
        assert _cluster(name) == render.with_train_storage(cluster_spec)


def test_training_clusters_share_checkpoint_storage(render: ModuleType) -> None:
    claim = load_yaml_documents(K8S_DIR / "storage" / "pvc-train.yaml")[0]
    assert (claim["kind"], claim["metadata"]["name"]) == (
        "PersistentVolumeClaim",
        render.TRAIN_CLAIM,
    )
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # every pod reads and writes it
    spec = _cluster("rayjob-data-parallel.yaml")
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
        claim_name = volumes["train-storage"]["persistentVolumeClaim"]["claimName"]
        assert claim_name == render.TRAIN_CLAIM
        container = _ray_container(group)
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        env = {e["name"]: e["value"] for e in container["env"]}
        assert mounts["train-storage"] == env["SOLANALM_TRAINING__OUTPUT_DIR"] == render.TRAIN_MOUNT_PATH
    assert "train-storage" not in str(_cluster("rayservice.yaml"))


@pytest.mark.parametrize(
    ("name", "module", "config"),
    [
        ("rayjob-data-parallel.yaml", "train_jobs.data_parallel", "configs/train/dp-tiny.yaml"),
        ("rayjob-federated.yaml", "train_jobs.federated", "configs/train/fl-tiny-dp.yaml"),
    ],
)
def test_rayjob_runs_the_training_entrypoint(name: str, module: str, config: str) -> None:
    spec = manifest(name)["spec"]
    assert spec["entrypoint"].split() == [
        "python",
        "-m",
        module,
        "--config",
        f"/home/ray/solanalm/{config}",
    ]
    assert spec["shutdownAfterJobFinishes"] is True
    assert "entrypointNumCpus" not in spec  # the driver runs on the head, which offers no CPUs


# ---- locking the cluster: token auth always, TLS behind render.py --tls --------------------------


@pytest.mark.parametrize("name", KUBERAY_MANIFESTS)
def test_every_cluster_runs_with_ray_token_auth(name: str) -> None:
    spec = _cluster(name)
    assert spec["authOptions"] == {"mode": "token"}
    assert "tlsOptions" not in spec  # opt-in: needs cert-manager and an operator feature gate
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        # KubeRay injects RAY_AUTH_MODE/RAY_AUTH_TOKEN from its Secret; a hand-set value would win.
        assert not {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} & {e["name"] for e in _ray_container(group)["env"]}


@pytest.mark.parametrize("name", KUBERAY_MANIFESTS)
def test_tls_render_matches_the_crd_and_needs_the_mtls_gate(render: ModuleType, tmp_path: Path, name: str) -> None:
    assert render.main(["--tls", "--out", str(tmp_path)]) == 0
    doc = load_yaml_documents(tmp_path / name)[0]
    assert list(iter_errors(doc)) == []
    spec = doc["spec"][CLUSTER_FIELD[doc["kind"]]]
    assert spec["tlsOptions"] == {"enabled": True} and spec["authOptions"] == {"mode": "token"}
    assert cluster_spec_problems(spec, frozenset({"RayClusterMTLS"})) == []
    assert "spec.tlsOptions requires the RayClusterMTLS feature gate to be enabled" in cluster_spec_problems(spec)


def test_tls_render_never_overwrites_the_committed_manifests(render: ModuleType) -> None:
    with pytest.raises(SystemExit):
        render.main(["--tls"])
    assert "tlsOptions" not in _cluster("rayservice.yaml")


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda c: c.update(rayVersion="2.51.0"), "is not >= 2.52.0"),
        (lambda c: c.update(authOptions={"enableK8sTokenAuth": True}), "mode not set to 'token'"),
        (
            lambda c: (
                c.update(tlsOptions={"enabled": True})
                or _ray_container(c["headGroupSpec"])["env"].append({"name": "RAY_USE_TLS", "value": "1"})
            ),
            "cannot set RAY_USE_TLS environment variable in head Pod",
        ),
    ],
    ids=["ray-too-old-for-token-auth", "k8s-auth-without-token-mode", "tls-env-next-to-tlsOptions"],
)
def test_kuberay_security_checks_reject(change: Any, expected: str) -> None:
    spec = copy.deepcopy(_cluster("rayservice.yaml"))
    change(spec)
    problems = cluster_spec_problems(spec, frozenset({"RayClusterMTLS"}))
    assert any(expected in p for p in problems), problems


def test_bad_auth_mode_is_rejected_by_the_crd() -> None:
    doc = _broken(lambda s, c: c.update(authOptions={"mode": "tokens"}))
    assert any("'tokens' is not one of" in e for e in iter_errors(doc))


# ---- the validator rejects what Kubernetes/KubeRay would ----------------------------------------


def _broken(change: Any) -> dict[str, Any]:
    doc = copy.deepcopy(manifest("rayservice.yaml"))
    change(doc["spec"], doc["spec"]["rayClusterConfig"])
    return doc


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            lambda s, c: c["headGroupSpec"].update(rayStartParam={}),
            "'rayStartParam' was unexpected",
        ),
        (lambda s, c: s.update(serveConfig="x"), "'serveConfig' was unexpected"),
        (
            lambda s, c: _ray_container(c["headGroupSpec"]).update(imagePullPolcy="Always"),
            "unexpected",
        ),
        (
            lambda s, c: c["workerGroupSpecs"][0].update(minReplicas="1"),
            "'1' is not of type 'integer'",
        ),
        (
            lambda s, c: c["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
            "0 is not of type",
        ),
        (
            lambda s, c: c["workerGroupSpecs"][0].pop("groupName"),
            "'groupName' is a required property",
        ),
        (lambda s, c: s.pop("rayClusterConfig"), "'rayClusterConfig' is a required property"),
        (lambda s, c: c.update(autoscalerOptions={"version": "v3"}), "'v3' is not one of"),
        (lambda s, c: s.update(serveConfigV2={"a": 1}), "is not of type 'string'"),
        (
            lambda s, c: _ray_container(c["headGroupSpec"])["env"].append(
                {"name": "SOLANALM_RAY__ADDRESS", "value": "x"}
            ),
            "duplicate entry {'name': 'SOLANALM_RAY__ADDRESS'}",
        ),
    ],
    ids=[
        "typo-in-group",
        "unknown-spec-field",
        "typo-in-pod-template",
        "string-for-integer",
        "integer-for-string",
        "missing-groupName",
        "missing-rayClusterConfig",
        "bad-enum",
        "map-for-serveConfigV2",
        "duplicate-env-name",
    ],
)
def test_broken_manifest_is_rejected(change: Any, expected: str) -> None:
    with pytest.raises(ManifestError) as excinfo:
        validate_manifest(_broken(change))
    assert any(expected in line for line in excinfo.value.errors), excinfo.value.errors


def test_bad_metadata_and_api_version_are_rejected() -> None:
    doc = copy.deepcopy(manifest("rayjob-federated.yaml"))
    doc["metadata"]["name"] = "Train_FL"
    assert any("does not match" in e for e in iter_errors(doc))
    doc["apiVersion"] = "ray.io/v9"
    assert any("no version 'v9'" in e for e in iter_errors(doc))
    doc["kind"] = "RayThing"
    assert any("not a KubeRay kind" in e for e in iter_errors(doc))


def test_int_or_string_quantities() -> None:
    for cpu, ok in (("2", True), (2, True), ([2], False), (2.5, False)):
        doc = _broken(lambda s, c, v=cpu: _ray_container(c["headGroupSpec"])["resources"]["limits"].update(cpu=v))
        assert (list(iter_errors(doc)) == []) is ok, cpu


def test_strict_schema_rules() -> None:
    schema = strict_schema(
        {
            "type": "object",
            "properties": {
                "closed": {"type": "object", "properties": {"a": {"type": "string"}}},
                "open": {
                    "type": "object",
                    "properties": {"a": {}},
                    "x-kubernetes-preserve-unknown-fields": True,
                },
                "map": {"type": "object", "additionalProperties": {"type": "string"}},
                "qty": {"x-kubernetes-int-or-string": True},
                "when": {"type": "string", "nullable": True},
            },
        }
    )
    valid = jsonschema.Draft7Validator(schema).is_valid
    assert valid({"open": {"b": 1}, "map": {"k": "v"}, "qty": 1, "when": None})
    assert valid({"qty": "500m"})
    assert not valid({"closed": {"b": "x"}})
    assert not valid({"extra": 1})
    assert not valid({"qty": 1.5})
    assert not valid({"map": {"k": 1}})


def test_strict_schema_does_not_mistake_field_names_for_keywords() -> None:
    fields = {"nullable": {"type": "boolean"}, "properties": {"type": "string"}, "type": {}}
    schema = strict_schema({"type": "object", "properties": fields})
    assert schema["properties"] == fields  # no `additionalProperties` or `anyOf` injected there
    assert jsonschema.Draft7Validator(schema).is_valid({"nullable": True, "properties": "x"})


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            lambda c: c["headGroupSpec"]["rayStartParams"].update(labels="a=b"),
            "rayStartParams['labels']",
        ),
        (
            lambda c: c["workerGroupSpecs"][0].update(minReplicas=9),
            "minReplicas (9) <= maxReplicas (8)",
        ),
        (
            lambda c: c["workerGroupSpecs"][1]["labels"].update({"solanalm.io/wallet": "not valid!"}),
            "invalid value",
        ),
        (
            lambda c: c["workerGroupSpecs"][1]["labels"].update({"-bad/key": "x"}),
            "invalid Ray label key",
        ),
        (lambda c: c["headGroupSpec"].update(resources={"CPU": "1"}), "both in rayStartParams"),
        (lambda c: c["headGroupSpec"]["template"]["spec"].update(containers=[]), "no container"),
        (
            lambda c: c["workerGroupSpecs"][0]["template"]["spec"].update(restartPolicy="Always"),
            "cpu-group: autoscaler v2 needs restartPolicy Never",
        ),
    ],
    ids=[
        "labels-in-rayStartParams",
        "min-above-max",
        "bad-label-value",
        "bad-label-key",
        "resources-twice",
        "no-container",
        "restart-policy-with-autoscaler-v2",
    ],
)
def test_kuberay_operator_checks_reject(change: Any, expected: str) -> None:
    spec = copy.deepcopy(_cluster("rayservice.yaml"))
    change(spec)
    assert any(expected in p for p in cluster_spec_problems(spec)), cluster_spec_problems(spec)


# ---- monitoring ---------------------------------------------------------------------------------


def test_monitors_have_the_expected_structure() -> None:
    docs = _monitoring_docs()
    assert docs
    for doc in docs:
        assert _monitor_errors(doc) == [], doc["metadata"]["name"]


def test_monitors_scrape_named_ports_of_the_ray_pods(cluster_spec: dict[str, Any]) -> None:
    ports = {
        "head": {p["name"] for p in _ray_container(cluster_spec["headGroupSpec"])["ports"]},
        "worker": set.intersection(
            *({p["name"] for p in _ray_container(g)["ports"]} for g in cluster_spec["workerGroupSpecs"])
        ),
    }
    scraped: dict[str, set[str]] = {"head": set(), "worker": set()}
    for doc in _monitoring_docs():
        role = doc["spec"]["selector"]["matchLabels"]["ray.io/node-type"]
        endpoints = doc["spec"].get("podMetricsEndpoints") or doc["spec"]["endpoints"]
        scraped[role] |= {e["port"] for e in endpoints}
    assert scraped["head"] <= ports["head"] and "metrics" in scraped["head"]
    assert scraped["worker"] <= ports["worker"] and "metrics" in scraped["worker"]


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d["spec"].update(podMetricEndpoints=d["spec"].pop("podMetricsEndpoints")),
        lambda d: d["spec"]["podMetricsEndpoints"][0].update(interval=15),
        lambda d: d["spec"]["podMetricsEndpoints"][0].pop("port"),
        lambda d: d.update(apiVersion="monitoring.coreos.com/v1alpha1"),
    ],
    ids=["typo-endpoints-field", "integer-interval", "missing-port", "wrong-apiVersion"],
)
def test_broken_monitor_is_rejected(change: Any) -> None:
    doc = copy.deepcopy(load_yaml_documents(MONITORING_DIR / "podmonitor-ray-workers.yaml")[0])
    change(doc)
    assert _monitor_errors(doc)


def test_readme_applies_files_that_exist() -> None:
    text = (K8S_DIR / "README.md").read_text()
    paths = re.findall(r"(?:-f|kubectl apply -f) (k8s/\S+)", text)
    assert {"k8s/rayservice.yaml", "k8s/values/ray-cluster.yaml", "k8s/monitoring/"} <= set(paths)
    assert all((K8S_DIR.parent / p).exists() for p in paths), paths
    assert text.count("--version 1.7.0") == 2
