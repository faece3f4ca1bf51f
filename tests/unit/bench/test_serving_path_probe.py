"""Pure helpers of bench/serving_path_probe.py: per-phase CPU rates, stage busy and mean step time."""

from types import ModuleType

import pytest

from tests.unit.bench.bench_loader import load_bench


@pytest.fixture(scope="module")
def probe() -> ModuleType:
    return load_bench("serving_path_probe")


def test_rates_are_per_wall_second_and_step_time_is_busy_per_step(probe: ModuleType) -> None:
    before = {"stage0": 10.0, "gateway": 1.0, "stage0.busy": 5.0, "stage0.steps": 100.0}
    after = {"stage0": 13.0, "gateway": 1.4, "stage0.busy": 6.8, "stage0.steps": 120.0}
    rates = probe.PhaseMeter.rates(before, after, wall_s=2.0)
    assert rates["cpu_s_per_s"] == {"stage0": 1.5, "gateway": 0.2}
    assert rates["stages"] == {"stage0": {"busy": 0.9, "step_ms": 90.0}}


def test_a_stage_that_ran_no_step_has_no_step_time(probe: ModuleType) -> None:
    same = {"stage1.busy": 2.0, "stage1.steps": 7.0}
    assert probe.PhaseMeter.rates(same, same, wall_s=1.0)["stages"] == {"stage1": {"busy": 0.0, "step_ms": None}}


def test_a_process_gone_mid_phase_is_left_out(probe: ModuleType) -> None:
    assert probe.PhaseMeter.rates({"proxy": 1.0, "client": 0.5}, {"client": 0.7}, wall_s=1.0)["cpu_s_per_s"] == {
        "client": 0.2
    }
