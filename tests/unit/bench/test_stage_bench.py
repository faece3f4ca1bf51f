"""Pure helpers of bench/stage_bench.py: the median timer and the figures it reports."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[3] / "bench" / "stage_bench.py"


@pytest.fixture(scope="module")
def stage_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("stage_bench", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCH.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH.parent))
    return module


def test_timed_skips_warm_up_calls_and_takes_the_median(stage_bench: ModuleType) -> None:
    calls: list[int] = []
    seconds = stage_bench.timed(calls.append, repeats=3)
    assert calls == [0, 1, 2, 3, 4] and seconds >= 0


def test_figures_are_per_token_and_per_step(stage_bench: ModuleType) -> None:
    figures = stage_bench._figures(0.2, {1: 0.02, 16: 0.08})
    assert figures["prefill_ms_per_token"] == pytest.approx(200 / stage_bench.PROMPT)
    assert figures["decode"]["16"] == {"ms_per_step": 80.0, "tok_s": 200.0}
    assert figures["decode"]["1"]["tok_s"] == 50.0
