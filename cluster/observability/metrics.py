"""Metric definitions as data, recorded through Ray's metrics API (exported by each node's Prometheus endpoint).

Each package declares its metrics as `MetricSpec`s (serve_apps/metrics.py, payments/metrics.py,
train_jobs/metrics.py) and records them through a `MetricSet`. The specs are plain data so the Grafana
tests can check every dashboard query against what the code exports, and `exported_names` says how
Ray names a metric on the endpoint: a `ray_` prefix, `_total` on counters, `_bucket/_count/_sum` on
histograms.

Ray metric objects are created lazily, in the process that records, on first use: a Serve replica then
gets Serve's deployment/replica tags (with the `ray.serve.metrics` flavour), and importing a module
never touches Ray. Recording never raises: a metric must not fail a request.
"""

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

logger = logging.getLogger(__name__)

MetricKind = Literal["counter", "gauge", "histogram"]
RAY_PREFIX = "ray_"  # Ray's Prometheus exporter prefixes every application metric with this
NAME_PREFIX = "solanalm_"

# Latency buckets in seconds: 5 ms .. 2 min, dense where interactive latencies live.
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """One metric: its name (prefixed `solanalm_`), kind, meaning, tag keys and histogram bucket bounds."""

    name: str
    kind: MetricKind
    description: str
    tag_keys: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if not self.name.startswith(NAME_PREFIX):
            raise ValueError(f"metric {self.name!r} must start with {NAME_PREFIX!r}")
        if (self.kind == "histogram") != bool(self.boundaries):
            raise ValueError(f"metric {self.name!r}: histograms, and only they, need boundaries")

    def exported_names(self) -> tuple[str, ...]:
        """The series names this metric has on Ray's Prometheus endpoint."""
        base = RAY_PREFIX + self.name
        if self.kind == "counter":
            return (base + "_total",)
        if self.kind == "histogram":
            return (base + "_bucket", base + "_count", base + "_sum")
        return (base,)


def exported_names(specs: Iterable[MetricSpec]) -> set[str]:
    """Every series name a group of specs produces on the endpoint."""
    return {name for spec in specs for name in spec.exported_names()}


class MetricSet:
    """Ray metric objects for a group of specs, created on first use in the recording process.

    `flavour` is the module whose Counter/Gauge/Histogram are used: `ray.util.metrics` (default) or
    `ray.serve.metrics` (adds the deployment, replica and application tags inside a Serve replica).
    Tests pass their own module-like object as a seam.
    """

    def __init__(self, specs: Iterable[MetricSpec], flavour: ModuleType | Any | None = None) -> None:
        self.specs = {spec.name: spec for spec in specs}
        self._flavour = flavour
        self._objects: dict[str, Any] = {}

    def inc(self, name: str, value: float = 1.0, **tags: str) -> None:
        if value > 0:
            self._record(name, "inc", value, tags)

    def set(self, name: str, value: float, **tags: str) -> None:
        self._record(name, "set", value, tags)

    def observe(self, name: str, value: float, **tags: str) -> None:
        self._record(name, "observe", value, tags)

    def _record(self, name: str, method: str, value: float, tags: dict[str, str]) -> None:
        try:
            metric = self._objects.get(name) or self._create(name)
            getattr(metric, method)(value, tags={key: str(tag) for key, tag in tags.items()})
        except Exception:  # noqa: BLE001 - metrics are best effort; a request must not fail on them
            logger.debug("could not record metric %s", name, exc_info=True)

    def _create(self, name: str) -> Any:
        spec = self.specs[name]
        flavour = self._flavour or _ray_util_metrics()
        if spec.kind == "counter":
            metric = flavour.Counter(spec.name, description=spec.description, tag_keys=spec.tag_keys)
        elif spec.kind == "gauge":
            metric = flavour.Gauge(spec.name, description=spec.description, tag_keys=spec.tag_keys)
        else:
            metric = flavour.Histogram(
                spec.name, description=spec.description, boundaries=list(spec.boundaries), tag_keys=spec.tag_keys
            )
        self._objects[name] = metric
        return metric


def _ray_util_metrics() -> ModuleType:
    from ray.util import metrics

    return metrics
