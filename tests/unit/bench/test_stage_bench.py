"""Pure helpers of bench/stage_bench.py: the median timer and the figures it reports."""

from types import ModuleType

import pytest

from tests.unit.bench.bench_loader import load_bench


@pytest.fixture(scope="module")
def stage_bench() -> ModuleType:
    return load_bench("stage_bench")


def test_timed_skips_warm_up_calls_and_takes_the_median(stage_bench: ModuleType) -> None:
    calls: list[int] = []
    seconds = stage_bench.timed(calls.append, repeats=3)
    assert calls == [0, 1, 2, 3, 4] and seconds >= 0


def test_figures_are_per_token_and_per_step(stage_bench: ModuleType) -> None:
    figures = stage_bench._figures(0.2, {1: 0.02, 16: 0.08})
    assert figures["prefill_ms_per_token"] == pytest.approx(200 / stage_bench.PROMPT)
    assert figures["decode"]["16"] == {"ms_per_step": 80.0, "tok_s": 200.0}
    assert figures["decode"]["1"]["tok_s"] == 50.0
