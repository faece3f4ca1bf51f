"""Pure helpers of bench/chaos_bench.py: outcome accounting against the baseline, percentiles."""

from types import ModuleType

import pytest

from tests.unit.bench.bench_loader import load_bench


@pytest.fixture(scope="module")
def cb() -> ModuleType:
    return load_bench("chaos_bench")


def test_summary_counts_failures_and_differences(cb: ModuleType) -> None:
    baseline = ["alpha", "beta"]
    outcomes = [
        cb.Outcome(0, 1.0, "alpha"),
        cb.Outcome(1, 2.0, "beta"),
        cb.Outcome(1, 3.0, "BETA"),  # answered, but not what the quiet system answered
        cb.Outcome(0, 9.0, None, "APIError: pipeline lost"),
    ]
    report = cb.summarize(outcomes, baseline, kills=3)
    assert (report.requests_ok, report.requests_failed, report.identical, report.kills) == (3, 1, 2, 3)
    assert report.identical_rate == pytest.approx(2 / 3)
    assert report.latency_p50_s == 2.0 and report.errors == {"APIError: pipeline lost": 1}


def test_percentile_interpolates(cb: ModuleType) -> None:
    assert cb.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert cb.percentile([5.0], 99) == 5.0
    with pytest.raises(ValueError):
        cb.percentile([], 50)


def test_prompts_are_distinct_and_stable(cb: ModuleType) -> None:
    assert cb.build_prompts(20) == cb.build_prompts(20)
    assert len(set(cb.build_prompts(20))) == 20
