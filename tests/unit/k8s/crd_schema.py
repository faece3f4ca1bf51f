"""Strict validation of manifests against the KubeRay v1.7.0 CRDs in ../shared/kuberay/crds.

`strict_schema` turns a CRD's `openAPIV3Schema` into a JSON schema that rejects what the API server
would reject or silently drop under `kubectl apply` (strict field validation):
- `additionalProperties: false` on every object schema that declares `properties` and neither sets
  `additionalProperties` nor `x-kubernetes-preserve-unknown-fields` (jsonschema allows extra keys
  by default; Kubernetes prunes or, with --validate=strict, rejects them);
- `x-kubernetes-int-or-string: true` without a type becomes `anyOf: [integer, string]`;
- `nullable: true` admits null;
- `x-kubernetes-list-type: map` lists must not repeat their `x-kubernetes-list-map-keys` (two env
  vars of one name, two volumes of one name): `StrictValidator` checks it; `set` lists get
  `uniqueItems`.
The root `metadata` (an untyped object in CRDs; the API server validates ObjectMeta itself) is
replaced by `OBJECT_META_SCHEMA`: the fields the project uses, names as KubeRay requires them.
CEL rules (`x-kubernetes-validations`) and `format`s are not evaluated. `cluster_spec_problems`
re-implements a subset of the checks KubeRay's operator makes beyond the CRD.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import yaml

REPO_ROOT = Path(__file__).resolve().parents[3]
# The project's reference material sits beside the repository; a clone elsewhere can point at it.
SHARED_DIR = Path(os.environ.get("SOLANALM_SHARED_DIR", REPO_ROOT.parent / "shared"))
CRD_DIR = SHARED_DIR / "kuberay" / "crds"
CHART_VALUES_DIR = SHARED_DIR / "kuberay" / "chart-values"

CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}

# KubeRay validates RayCluster/RayJob names as DNS-1035 labels (ValidateRayClusterMetadata).
DNS_1035_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
OBJECT_META_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": DNS_1035_LABEL, "maxLength": 63},
        "namespace": {"type": "string", "pattern": DNS_1035_LABEL, "maxLength": 63},
        "labels": _STRING_MAP,
        "annotations": _STRING_MAP,
    },
}


class ManifestError(ValueError):
    """A manifest does not match its CRD; `errors` holds one line per violation."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    """Every non-empty document of a (multi-document) YAML file."""
    return [doc for doc in yaml.load_all(path.read_text(), Loader=yaml.CSafeLoader) if doc]


@functools.cache
def load_crd(kind: str) -> dict[str, Any]:
    """The CustomResourceDefinition of a KubeRay kind, parsed once per process."""
    if kind not in CRD_FILES:
        raise KeyError(f"no KubeRay CRD for kind {kind!r}; known: {sorted(CRD_FILES)}")
    return yaml.load((CRD_DIR / CRD_FILES[kind]).read_text(), Loader=yaml.CSafeLoader)


def openapi_schema(crd: dict[str, Any], version: str) -> dict[str, Any]:
    """The `openAPIV3Schema` of a served version of a CRD."""
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            if not entry.get("served", False):
                raise ValueError(f"{crd['metadata']['name']}: version {version} is not served")
            return entry["schema"]["openAPIV3Schema"]
    names = [entry["name"] for entry in crd["spec"]["versions"]]
    raise ValueError(f"{crd['metadata']['name']}: no version {version!r} (has {names})")


def strict_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of an OpenAPI v3 (structural) schema, tightened as the module docstring says.

    Recurses only through schema-valued keywords, so a field that happens to be named like a
    keyword (`type`, `nullable`, ...) is never mistaken for one.
    """
    out = dict(schema)
    if "properties" in schema:
        out["properties"] = {name: strict_schema(sub) for name, sub in schema["properties"].items()}
    for keyword in ("items", "additionalProperties", "not"):
        if isinstance(schema.get(keyword), dict):
            out[keyword] = strict_schema(schema[keyword])
    for keyword in ("anyOf", "allOf", "oneOf"):
        if keyword in schema:
            out[keyword] = [strict_schema(sub) for sub in schema[keyword]]
    if schema.get("x-kubernetes-int-or-string") and "type" not in schema and "anyOf" not in schema:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if schema.get("nullable") and isinstance(schema.get("type"), str):
        out["type"] = [schema["type"], "null"]
    if schema.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    preserves = schema.get("x-kubernetes-preserve-unknown-fields", False)
    if "properties" in schema and "additionalProperties" not in schema and not preserves:
        out["additionalProperties"] = False
    return out


def _unique_list_map_keys(
    validator: Any, keys: list[str], instance: Any, schema: dict[str, Any]
) -> Iterator[jsonschema.ValidationError]:
    if schema.get("x-kubernetes-list-type") != "map" or not validator.is_type(instance, "array"):
        return
    seen: set[tuple[Any, ...]] = set()
    for item in instance:
        if not isinstance(item, dict):
            continue
        key = tuple(item.get(k) for k in keys)
        if key in seen:
            yield jsonschema.ValidationError(f"duplicate entry {dict(zip(keys, key, strict=True))}")
        seen.add(key)


StrictValidator = jsonschema.validators.extend(
    jsonschema.Draft7Validator, {"x-kubernetes-list-map-keys": _unique_list_map_keys}
)


@functools.cache
def _strict_openapi(kind: str, version: str) -> dict[str, Any]:
    return strict_schema(openapi_schema(load_crd(kind), version))


@functools.cache
def _validator(kind: str, version: str) -> jsonschema.protocols.Validator:
    schema = dict(_strict_openapi(kind, version))
    schema["properties"] = {**schema["properties"], "metadata": OBJECT_META_SCHEMA}
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata", "spec"})
    return StrictValidator(schema)


def _api_version(manifest: dict[str, Any], kind: str) -> str:
    group = load_crd(kind)["spec"]["group"]
    api_version = str(manifest.get("apiVersion", ""))
    prefix = f"{group}/"
    if not api_version.startswith(prefix):
        raise ManifestError([f"apiVersion {api_version!r} is not in group {group}"])
    return api_version[len(prefix) :]


def iter_errors(manifest: dict[str, Any]) -> Iterator[str]:
    """One readable line per violation: `path.to.field: message`."""
    kind = manifest.get("kind")
    if kind not in CRD_FILES:
        yield f"kind {kind!r} is not a KubeRay kind {sorted(CRD_FILES)}"
        return
    try:
        version = _api_version(manifest, kind)
        validator = _validator(kind, version)
    except (ManifestError, ValueError) as exc:
        yield str(exc)
        return
    for error in sorted(validator.iter_errors(manifest), key=lambda e: list(e.absolute_path)):
        where = ".".join(str(p) for p in error.absolute_path) or "<root>"
        yield f"{where}: {error.message}"


def validate_manifest(manifest: dict[str, Any]) -> None:
    """Raise `ManifestError` listing every way a manifest breaks its KubeRay CRD."""
    errors = list(iter_errors(manifest))
    if errors:
        raise ManifestError(errors)


def sub_schema(kind: str, version: str, *path: str) -> dict[str, Any]:
    """The strict schema at a path of property names ("[]" steps into array items)."""
    node = _strict_openapi(kind, version)
    for step in path:
        node = node["items"] if step == "[]" else node["properties"][step]
    return node


# Kubernetes label syntax (apimachinery IsQualifiedName / IsValidLabelValue).
_LABEL_NAME = r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)"
_LABEL_PREFIX = r"([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*)"
LABEL_KEY = re.compile(rf"^({_LABEL_PREFIX}/)?{_LABEL_NAME}$")
LABEL_VALUE = re.compile(rf"^({_LABEL_NAME})?$")
_RAY_START_RESOURCES = ("num-cpus", "num-gpus", "memory", "resources")


def _group_problems(name: str, group: dict[str, Any]) -> Iterator[str]:
    params = group.get("rayStartParams", {})
    containers = group.get("template", {}).get("spec", {}).get("containers", [])
    if not containers:
        yield f"{name}: the pod template has no container"
    if "labels" in params:
        yield f"{name}: rayStartParams['labels'] is rejected; use the group's labels field"
    if group.get("resources") and any(params.get(k) for k in _RAY_START_RESOURCES):
        yield f"{name}: resources set both in rayStartParams and in the resources field"
    for key, value in group.get("labels", {}).items():
        if len(key.rsplit("/", 1)[0]) > 253 or not LABEL_KEY.match(key):
            yield f"{name}: invalid Ray label key {key!r}"
        if not LABEL_VALUE.match(value):
            yield f"{name}: invalid value {value!r} of label {key!r}"


_TLS_ENV = ("RAY_USE_TLS", "RAY_TLS_SERVER_CERT", "RAY_TLS_SERVER_KEY", "RAY_TLS_CA_CERT")
_MIN_TOKEN_AUTH_RAY = (2, 52, 0)


def _version(text: str) -> tuple[int, ...] | None:
    match = re.match(r"^v?(\d+)\.(\d+)(?:\.(\d+))?", text)
    return tuple(int(part or 0) for part in match.groups()) if match else None


def _security_problems(spec: dict[str, Any], feature_gates: frozenset[str]) -> Iterator[str]:
    """KubeRay v1.7.0's authOptions and tlsOptions checks (validation.go)."""
    auth = spec.get("authOptions") or {}
    if auth.get("mode") == "token":
        version = _version(str(spec.get("rayVersion", "")))
        if version is None or version < _MIN_TOKEN_AUTH_RAY:
            yield f"authOptions.mode is 'token' but rayVersion {spec.get('rayVersion')!r} is not >= 2.52.0"
    elif auth.get("enableK8sTokenAuth"):
        yield "authOptions.enableK8sTokenAuth is enabled but authOptions.mode not set to 'token'"
    tls = spec.get("tlsOptions")
    if tls is not None and "RayClusterMTLS" not in feature_gates:
        yield "spec.tlsOptions requires the RayClusterMTLS feature gate to be enabled"
    if tls and tls.get("enabled"):
        groups = [("head Pod", spec.get("headGroupSpec", {}))]
        groups += [(f"worker group {g.get('groupName')!r}", g) for g in spec.get("workerGroupSpecs", [])]
        for name, group in groups:
            containers = group.get("template", {}).get("spec", {}).get("containers", [])
            names = {e.get("name") for e in (containers[0].get("env", []) if containers else [])}
            for env in sorted(names & set(_TLS_ENV)):
                yield f"cannot set {env} environment variable in {name} when tlsOptions is set"


def cluster_spec_problems(spec: dict[str, Any], feature_gates: frozenset[str] = frozenset()) -> list[str]:
    """A subset of what KubeRay's ValidateRayClusterSpec (operator-side, not the CRD) rejects;
    `feature_gates`: the operator's enabled gates."""
    problems = list(_group_problems("headGroupSpec", spec.get("headGroupSpec", {})))
    problems += _security_problems(spec, feature_gates)
    autoscaling = spec.get("enableInTreeAutoscaling", False)
    v2 = autoscaling and spec.get("autoscalerOptions", {}).get("version") == "v2"
    groups = [spec.get("headGroupSpec", {}), *spec.get("workerGroupSpecs", [])]
    for group in groups if v2 else []:
        if group.get("template", {}).get("spec", {}).get("restartPolicy", "Never") != "Never":
            problems.append(f"{group.get('groupName', 'head')}: autoscaler v2 needs restartPolicy Never")
    for group in spec.get("workerGroupSpecs", []):
        name = f"workerGroup {group.get('groupName')}"
        problems += _group_problems(name, group)
        low, high = group.get("minReplicas"), group.get("maxReplicas")
        if not autoscaling and (low is None or high is None):
            problems.append(f"{name}: minReplicas and maxReplicas are required without autoscaling")
        if low is not None and high is not None and not 0 <= low <= high:
            problems.append(f"{name}: needs 0 <= minReplicas ({low}) <= maxReplicas ({high})")
    return problems
