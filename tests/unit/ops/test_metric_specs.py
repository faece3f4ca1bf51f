"""Metric definitions: naming rules, exported names, and a MetricSet recording through Ray's metric API shape."""

import pytest

from cluster.observability.metrics import MetricSet, MetricSpec, exported_names
from payments import metrics as payments_metrics
from serve_apps import metrics as serve_metrics
from tests.unit.ops.fakes import FakeFlavour
from train_jobs import metrics as train_metrics

ALL_SPECS = serve_metrics.SPECS + payments_metrics.SPECS + train_metrics.SPECS


def test_every_metric_is_prefixed_unique_and_described() -> None:
    names = [spec.name for spec in ALL_SPECS]
    assert len(names) == len(set(names))
    assert all(spec.name.startswith("solanalm_") and len(spec.description) > 20 for spec in ALL_SPECS)


def test_issue_metrics_are_all_defined() -> None:
    names = {spec.name for spec in ALL_SPECS}
    for wanted in (
        "solanalm_requests",
        "solanalm_prompt_tokens",
        "solanalm_completion_tokens",
        "solanalm_ttft_seconds",
        "solanalm_time_per_output_token_seconds",
        "solanalm_stage_forward_seconds",
        "solanalm_queue_depth",
        "solanalm_kv_slots_used",
        "solanalm_settlement_batches_pending",
        "solanalm_payouts_confirmed",
        "solanalm_lamports_paid",
        "solanalm_verification_failures",
        "solanalm_fl_round_duration_seconds",
        "solanalm_fl_epsilon",
    ):
        assert wanted in names


def test_exported_names_follow_rays_prometheus_naming() -> None:
    counter = MetricSpec("solanalm_a", "counter", "a counter for the test")
    gauge = MetricSpec("solanalm_b", "gauge", "a gauge for the test")
    histogram = MetricSpec("solanalm_c_seconds", "histogram", "a histogram for the test", boundaries=(1.0,))
    assert counter.exported_names() == ("ray_solanalm_a_total",)
    assert gauge.exported_names() == ("ray_solanalm_b",)
    assert set(histogram.exported_names()) == {
        "ray_solanalm_c_seconds_bucket",
        "ray_solanalm_c_seconds_count",
        "ray_solanalm_c_seconds_sum",
    }
    assert exported_names([counter, gauge]) == {"ray_solanalm_a_total", "ray_solanalm_b"}


@pytest.mark.parametrize(
    ("name", "kind", "boundaries"),
    [("requests", "counter", ()), ("solanalm_x", "histogram", ()), ("solanalm_x", "gauge", (1.0,))],
)
def test_bad_specs_are_rejected(name: str, kind: str, boundaries: tuple[float, ...]) -> None:
    with pytest.raises(ValueError):
        MetricSpec(name, kind, "described well enough", boundaries=boundaries)  # type: ignore[arg-type]


def test_metric_set_creates_once_and_passes_string_tags() -> None:
    fake = FakeFlavour()
    spec = MetricSpec("solanalm_t", "histogram", "histogram for the test", ("model", "stage"), (0.1, 1.0))
    metrics = MetricSet([spec], fake)
    metrics.observe("solanalm_t", 0.5, model="m", stage=3)  # type: ignore[arg-type]
    metrics.observe("solanalm_t", 0.7, model="m", stage="3")
    created = fake.created["solanalm_t"]
    assert created.kind == "histogram" and created.boundaries == [0.1, 1.0] and created.tag_keys == ("model", "stage")
    tags = {"model": "m", "stage": "3"}
    assert created.calls == [("observe", 0.5, tags), ("observe", 0.7, tags)]


def test_recording_never_raises_and_counters_skip_zero() -> None:
    class Broken(FakeFlavour):
        def Counter(self, name, description, tag_keys):  # type: ignore[no-untyped-def] # noqa: N802
            raise RuntimeError("metrics backend down")

    metrics = MetricSet([MetricSpec("solanalm_c", "counter", "counter for the test")], Broken())
    metrics.inc("solanalm_c", 1)  # logged at debug, not raised
    fake = FakeFlavour()
    ok = MetricSet([MetricSpec("solanalm_c", "counter", "counter for the test")], fake)
    ok.inc("solanalm_c", 0)
    assert "solanalm_c" not in fake.created  # Ray rejects inc(0); nothing to record anyway
