"""Check Helm values files against the KubeRay charts' defaults (../shared/kuberay/chart-values).

A key a values file sets must exist in the chart's default `values.yaml`, with three exceptions that
are data, not guesswork:
- below a default that is an empty map or list (`labels: {}`, `tolerations: []`) anything goes:
  the chart passes it through to Kubernetes; `TYPED_PATHS` maps those values to the RayCluster CRD
  fields they end up in, so the tests validate them with the CRD's schema instead;
- `OPEN_MAPS`: non-empty defaults that are Kubernetes maps (`resources.limits` + nvidia.com/gpu);
- `COMMENTED_DEFAULTS`: keys the chart documents only as commented-out defaults
  (`# enableInTreeAutoscaling: true`); `commented_default_missing` checks each still appears so.
A value must also be of the default's kind (map, list or scalar).
`NAMED_MAPS` are maps whose keys the user names (`additionalWorkerGroups.<group>`); each entry is
checked against the default's example entry.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from tests.unit.k8s.crd_schema import CHART_VALUES_DIR

CHARTS = ("kuberay-operator", "ray-cluster")

NAMED_MAPS: dict[str, dict[str, str]] = {
    "ray-cluster": {"additionalWorkerGroups": "smallGroup"},
}

OPEN_MAPS: dict[str, tuple[str, ...]] = {
    "kuberay-operator": ("resources.limits", "resources.requests"),
    "ray-cluster": ("*.resources.limits", "*.resources.requests"),
}

# Keys documented only as commented-out defaults, with an example value of the right kind; merged
# into the parsed defaults. An empty map or list means "free-form below", as in the defaults.
COMMENTED_DEFAULTS: dict[str, dict[str, Any]] = {
    "kuberay-operator": {"resources": {"requests": {}}},
    "ray-cluster": {
        "head": {
            "rayVersion": "2.52.0",
            "enableInTreeAutoscaling": True,
            "autoscalerOptions": {
                "upscalingMode": "Default",
                "idleTimeoutSeconds": 60,
                "env": [],
                "resources": {},
            },
            "ports": [],
        },
        "worker": {"ports": []},
        "additionalWorkerGroups": {"smallGroup": {"ports": []}},
    },
}

# ray-cluster values that the chart copies into the RayCluster: values path pattern -> CRD path.
_POD = ("spec", "headGroupSpec", "template", "spec")
_CONTAINER = (*_POD, "containers", "[]")
TYPED_PATHS: dict[str, tuple[str, ...]] = {
    "head.autoscalerOptions": ("spec", "autoscalerOptions"),
    "*.rayStartParams": ("spec", "headGroupSpec", "rayStartParams"),
    "*.labels": ("spec", "headGroupSpec", "template", "metadata", "labels"),
    "*.resources": (*_CONTAINER, "resources"),
    "*.containerEnv": (*_CONTAINER, "env"),
    "*.ports": (*_CONTAINER, "ports"),
    "*.volumeMounts": (*_CONTAINER, "volumeMounts"),
    "*.volumes": (*_POD, "volumes"),
    "*.nodeSelector": (*_POD, "nodeSelector"),
    "*.tolerations": (*_POD, "tolerations"),
    "*.replicas": ("spec", "workerGroupSpecs", "[]", "replicas"),
    "*.minReplicas": ("spec", "workerGroupSpecs", "[]", "minReplicas"),
    "*.maxReplicas": ("spec", "workerGroupSpecs", "[]", "maxReplicas"),
}


def defaults_path(chart: str) -> Path:
    return CHART_VALUES_DIR / f"{chart}.values.yaml"


def load_defaults(chart: str) -> dict[str, Any]:
    return yaml.safe_load(defaults_path(chart).read_text())


def _matches(path: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(path, pattern) for pattern in patterns)


def _generic(path: str, chart: str) -> str:
    """`additionalWorkerGroups.gpu-group.ports` -> `additionalWorkerGroups.*.ports`."""
    parts = path.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in NAMED_MAPS.get(chart, {}):
            parts[i + 1] = "*"
    return ".".join(parts)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        both_maps = isinstance(value, dict) and isinstance(base.get(key), dict)
        merged[key] = _merge(base[key], value) if both_maps else base.get(key, value)
    return merged


def effective_defaults(chart: str) -> dict[str, Any]:
    """The chart's parsed defaults plus its commented-out documented keys."""
    return _merge(load_defaults(chart), COMMENTED_DEFAULTS.get(chart, {}))


def _kind(value: Any) -> str:
    return "map" if isinstance(value, dict) else "list" if isinstance(value, list) else "scalar"


def unknown_keys(values: dict[str, Any], chart: str) -> list[str]:
    """Paths a values file sets that the chart's defaults lack or hold as another kind of value."""
    return list(_walk(values, effective_defaults(chart), "", chart))


def _walk(value: Any, default: Any, path: str, chart: str) -> Iterator[str]:
    if default is not None and _kind(value) != _kind(default):
        yield f"{path}: a {_kind(default)} in the chart defaults, got a {_kind(value)}"
        return
    if not isinstance(value, dict) or not default or _matches(path, OPEN_MAPS.get(chart, ())):
        return  # a leaf, or free-form below this key
    named = NAMED_MAPS.get(chart, {})
    for key, child in value.items():
        child_path = f"{path}.{key}" if path else str(key)
        if path in named:
            yield from _walk(child, default[named[path]], child_path, chart)
        elif key in default:
            yield from _walk(child, default[key], child_path, chart)
        else:
            yield f"{child_path}: not a key of the {chart} chart"


def _commented_keys(extra: dict[str, Any], parsed: Any) -> Iterator[str]:
    for key, value in extra.items():
        present = isinstance(parsed, dict) and key in parsed
        if not present:
            yield key
        if isinstance(value, dict):
            yield from _commented_keys(value, parsed[key] if present else {})


def commented_default_missing(chart: str) -> list[str]:
    """Keys of COMMENTED_DEFAULTS that the chart's defaults file no longer shows commented out."""
    text = defaults_path(chart).read_text()
    keys = _commented_keys(COMMENTED_DEFAULTS.get(chart, {}), load_defaults(chart))
    return [k for k in keys if not re.search(rf"^\s*#\s*{re.escape(k)}:", text, flags=re.MULTILINE)]


def typed_values(values: dict[str, Any], chart: str) -> list[tuple[str, Any, tuple[str, ...]]]:
    """(values path, value, CRD path) of each value `TYPED_PATHS` maps to a RayCluster field."""
    found: list[tuple[str, Any, tuple[str, ...]]] = []

    def visit(node: Any, path: str) -> None:
        for pattern, crd_path in TYPED_PATHS.items():
            if path and fnmatch.fnmatchcase(_generic(path, chart), pattern):
                found.append((path, node, crd_path))
                return
        if isinstance(node, dict):
            for key, child in node.items():
                visit(child, f"{path}.{key}" if path else str(key))

    visit(values, "")
    return found
