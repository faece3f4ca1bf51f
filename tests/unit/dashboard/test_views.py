"""The dashboard's view models: live rates and latencies from metric taps, layer bars, money and training
rows, sessions and CSRF tokens."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from serve_apps.dashboard import reads, views


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_live_stats_rates_are_differences_between_reads_and_latencies_are_recent_means() -> None:
    clock = Clock()
    stats = views.LiveStats(clock)
    first = stats.figures()
    assert first == {}
    stats.tap("solanalm_requests", "inc", 1, {"model": "m", "status": "ok"})
    stats.tap("solanalm_requests", "inc", 1, {"model": "m", "status": "429"})  # a rejection is no answer
    stats.tap("solanalm_completion_tokens", "inc", 10, {"model": "m"})
    stats.tap("solanalm_ttft_seconds", "observe", 0.2, {"model": "m"})
    assert stats.figures()["m"]["requests_per_s"] is None  # one read: no interval yet
    clock.now += 2
    for _ in range(4):
        stats.tap("solanalm_requests", "inc", 1, {"model": "m", "status": "ok"})
    stats.tap("solanalm_completion_tokens", "inc", 30, {"model": "m"})
    stats.tap("solanalm_ttft_seconds", "observe", 0.4, {"model": "m"})
    stats.tap("solanalm_time_per_output_token_seconds", "observe", 0.05, {"model": "m"})
    figures = stats.figures()["m"]
    assert figures["requests_per_s"] == pytest.approx(2.0) and figures["tokens_per_s"] == pytest.approx(15.0)
    assert figures["ttft_ms"] == pytest.approx(300.0) and figures["tpot_ms"] == pytest.approx(50.0)
    assert figures["requests_total"] == 5
    clock.now += views.WINDOW_S + 1  # the window slid past every latency sample
    later = stats.figures()["m"]
    assert later["ttft_ms"] is None and later["requests_per_s"] == 0.0


def test_series_point_sums_rates_and_averages_latencies_over_models() -> None:
    point = views.series_point(
        5.0,
        {
            "a": {"requests_per_s": 1.0, "tokens_per_s": 10.0, "ttft_ms": 100.0, "tpot_ms": None},
            "b": {"requests_per_s": 2.0, "tokens_per_s": None, "ttft_ms": 300.0, "tpot_ms": None},
        },
    )
    assert point == {"t": 5.0, "requests_per_s": 3.0, "tokens_per_s": 10.0, "ttft_ms": 200.0, "tpot_ms": None}


def test_layer_bars_span_the_width_in_stage_order() -> None:
    stages = [{"index": 1, "layers": (20, 30), "node_id": "n2"}, {"index": 0, "layers": (0, 20), "node_id": "n1"}]
    bars = views.layer_bars(stages, 30, 600, {"n1": "WalletOne"})
    assert [(b.stage, b.x, b.width) for b in bars] == [(0, 0.0, 400.0), (1, 400.0, 200.0)]
    assert (bars[0].wallet, bars[1].wallet) == ("WalletOne", None)
    with pytest.raises(ValueError, match="outside"):
        views.layer_bars([{"index": 0, "layers": (0, 31)}], 30, 600)


def test_pipeline_figures_take_the_fewest_kv_slots_of_any_stage() -> None:
    def stage(i: int, kv: int) -> SimpleNamespace:
        return SimpleNamespace(stage_index=i, layer_start=i, layer_end=i + 1, node_id="n", pid=1, kv_slots=kv)

    info = SimpleNamespace(
        model="m", replica_id="r", queue_depth=2, running=3, steps=9, num_layers=2, stages=(stage(0, 8), stage(1, 6))
    )
    figures = views.pipeline_figures(info)
    assert (figures.kv_slots_total, figures.queue_depth, figures.running, len(figures.stages)) == (6, 2, 3, 2)


def test_provider_rows_sort_healthy_first_and_say_verification() -> None:
    rows = views.provider_rows(
        [
            {"node_id": "b", "wallet": "W2", "health": "dead", "capabilities": {"num_cpus": 4}},
            {"node_id": "a", "wallet": "W1", "health": "alive", "verified": True, "verifications_passed": 3},
        ]
    )
    assert [r["node_id"] for r in rows] == ["a", "b"]
    assert rows[0]["verifications"] == "3 ok / 0 failed" and rows[1]["hardware"] == "cpu · 4 CPU"


def test_money_rows() -> None:
    assert views.money_wallets({"B": 3}, ["A", None], {"C"}) == ["A", "B", "C"]
    pending, paid = views.payout_split([{"state": "confirmed", "amount": 1}, {"state": "sent", "amount": 2}])
    assert [p["amount"] for p in pending] == [2] and [p["amount"] for p in paid] == [1]


def test_training_rows_from_a_federated_summary_and_ray_train_results() -> None:
    summary = {
        "rounds": [
            {"round": 1, "train_loss": 2.5, "client_epsilon": {"c1": 0.5}, "rewards_lamports": {"W": 10}},
            {"round": 2, "train_loss": 2.1, "client_epsilon": {"c1": 0.9}, "rewards_lamports": {"W": 5, "V": 1}},
        ]
    }
    rounds = views.fl_rounds(summary)
    assert [r["train_loss"] for r in rounds] == [2.5, 2.1] and rounds[1]["client_epsilon"] == {"c1": 0.9}
    assert views.rewards_by_wallet(rounds) == {"V": 1, "W": 15}
    lines = [
        json.dumps({"step": 1, "loss": 3.0}),
        "not json",
        json.dumps({"step": 2}),
        json.dumps({"step": 2, "loss": 2}),
    ]
    assert views.train_steps(lines) == [(1, 3.0), (2, 2.0)]


def test_operator_session_and_csrf() -> None:
    key = b"k" * 32
    cookie = views.operator_session(key, 1_000)
    assert views.operator_session_valid(key, cookie, 999)
    assert not views.operator_session_valid(key, cookie, 1_001)  # expired
    assert not views.operator_session_valid(b"x" * 32, cookie, 999)  # another gateway's key
    assert not views.operator_session_valid(key, "2000." + cookie.split(".")[1], 999)  # expiry moved
    assert not views.operator_session_valid(key, None, 0)
    token = views.csrf_token(key, cookie)
    assert views.csrf_valid(key, cookie, token)
    assert not views.csrf_valid(key, "other-session", token) and not views.csrf_valid(key, cookie, "")
    assert not views.csrf_valid(key, None, views.csrf_token(key, None))


def test_fmt() -> None:
    assert (views.fmt(None), views.fmt(float("nan")), views.fmt(1.234, 2), views.fmt("x")) == ("-", "-", "1.23", "-")


def test_checkpoint_steps_from_ray_train_v2_snapshot() -> None:
    snapshot = {
        "checkpoint_results": [
            {"checkpoint_dir_name": "checkpoint_2", "metrics": {"step": 20, "loss": 2.0, "epoch": 0}},
            {"checkpoint_dir_name": "checkpoint_1", "metrics": {"step": 10, "loss": 3.5}},
            {"checkpoint_dir_name": "checkpoint_x", "metrics": {"epoch": 1}},
        ]
    }
    assert views.checkpoint_steps(snapshot) == [(10, 3.5), (20, 2.0)]


def test_read_runs_finds_federated_and_ray_train_runs(tmp_path: Path) -> None:
    fl = tmp_path / "fl-run"
    fl.mkdir()
    rounds = [{"round": 1, "train_loss": 11.8, "client_epsilon": {"W": 6.3}, "rewards_lamports": {"W": 15000}}]
    (fl / "summary.json").write_text(json.dumps({"job": "fl-run", "rounds": rounds}))
    dp = tmp_path / "dp-run"
    dp.mkdir()
    snapshot = {"checkpoint_results": [{"checkpoint_dir_name": "c", "metrics": {"step": 4, "loss": 1.5}}]}
    (dp / "checkpoint_manager_snapshot.json").write_text(json.dumps(snapshot))
    (tmp_path / "unrelated").mkdir()
    runs = {run["name"]: run for run in reads.read_runs(tmp_path)}
    assert set(runs) == {"fl-run", "dp-run"}
    assert runs["fl-run"]["rewards"] == {"W": 15000} and runs["dp-run"]["steps"] == [(4, 1.5)]
    assert reads.read_runs(tmp_path / "missing") == []
