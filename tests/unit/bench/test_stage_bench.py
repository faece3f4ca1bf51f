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


def test_background_load_spec_parses_busy_and_sleep_ms(stage_bench: ModuleType) -> None:
    assert stage_bench.parse_load("1:2, 0.3:2") == [(1.0, 2.0), (0.3, 2.0)]
    assert stage_bench.parse_load("") == []


@pytest.mark.parametrize("spec", ["0:2", "1:-1", "x:1"])
def test_a_bad_background_load_is_refused(stage_bench: ModuleType, spec: str) -> None:
    with pytest.raises(ValueError):
        stage_bench.parse_load(spec)


def test_background_load_processes_run_only_inside_the_block(stage_bench: ModuleType) -> None:
    import psutil

    before = set(psutil.Process().children())
    with stage_bench.background_load([(0.1, 5.0)]):
        spinners = set(psutil.Process().children()) - before
        assert len(spinners) == 1 and all(p.is_running() for p in spinners)
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in spinners)
