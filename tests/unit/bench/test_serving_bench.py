"""Pure helpers of bench/serving_bench.py: percentiles, rates, phase summaries, prompts, target ratios."""

from types import ModuleType

import pytest

from tests.unit.bench.bench_loader import load_bench


@pytest.fixture(scope="module")
def sb() -> ModuleType:
    return load_bench("serving_bench")


class WordTokenizer:
    """One token per whitespace-separated word: enough to check prompt lengths."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[str]:
        return text.split()

    def decode(self, ids: list[str]) -> str:
        return " ".join(ids)


def test_percentile_interpolates(sb: ModuleType) -> None:
    assert sb.percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert sb.percentile([0.0, 10.0], 99) == pytest.approx(9.9)
    assert sb.percentile([5.0], 99) == 5.0
    with pytest.raises(ValueError):
        sb.percentile([], 50)


def test_decode_rate_excludes_first_token(sb: ModuleType) -> None:
    assert sb.decode_rate(sb.Timing(0.0, 1.0, 2.0, 11)) == pytest.approx(10.0)
    assert sb.decode_rate(sb.Timing(0.0, 1.0, 1.0, 1)) == 0.0


def test_summarize_counts_errors_and_aggregate(sb: ModuleType) -> None:
    timings = [sb.Timing(0.0, 0.1, 1.0, 10), sb.Timing(0.0, 0.3, 1.0, 10), sb.Timing(0.0, 0.0, 0.5, 0, "boom")]
    out = sb.summarize(timings, 2.0)
    assert out["tokens"] == 20 and out["errors"] == 1 and out["aggregate_tok_s"] == 10.0
    assert out["ttft_ms_p50"] == 200.0 and out["error_messages"] == ["boom"]


def test_prompts_are_deterministic_distinct_and_sized(sb: ModuleType) -> None:
    first = sb.build_prompts(WordTokenizer(), 8, 100)
    assert first == sb.build_prompts(WordTokenizer(), 8, 100)
    assert len(set(first)) == 8
    assert all(95 <= len(p.split()) <= 100 for p in first)


def test_targets_are_ratios_and_missing_systems_are_unknown(sb: ModuleType) -> None:
    systems = {
        "solanalm-1": {"decode": {"decode_tok_s": 10.0}, "concurrency": {"16": {"aggregate_tok_s": 100.0}}},
        "solanalm-3": {"decode": {"decode_tok_s": 9.0}, "concurrency": {"16": {"aggregate_tok_s": 80.0}}},
    }
    rows = {row["target"]: row for row in sb.check_targets(systems)}
    assert rows["3 stages vs 1 stage, aggregate at 16 streams"] == {
        "target": "3 stages vs 1 stage, aggregate at 16 streams",
        "ratio": 0.8,
        "needed": 0.9,
        "met": False,
    }
    assert rows["3 stages vs 1 stage, single-stream decode"]["met"] is True
    assert rows["64 streams vs llama-cpp-python"]["met"] is None


def test_per_token_splits_a_tokens_wall_time_by_process(sb: ModuleType) -> None:
    decode = {"decode_tok_s": 50.0, "cpu_s_per_s": {"stage0": 0.5, "stage1.busy": 0.4, "replica": 0.05}}
    out = sb.per_token(decode)
    assert out["wall_ms_per_token"] == 20.0
    assert out["ms_per_token"] == {"stage0": 10.0, "stage1.busy": 8.0, "replica": 1.0}
    assert sb.per_token({"decode_tok_s": 0.0}) == {}


def test_llama_server_binary_is_the_built_one_or_a_clear_error(sb: ModuleType, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(sb, "LLAMA_SERVER_CACHE", tmp_path)
    with pytest.raises(FileNotFoundError, match="build_llama_server.sh"):
        sb.llama_server_binary()
    built = tmp_path / "11434.0.0" / "build" / "bin" / "llama-server"
    built.parent.mkdir(parents=True)
    built.write_text("")
    assert sb.llama_server_binary() == built
    with pytest.raises(FileNotFoundError):
        sb.llama_server_binary(tmp_path / "missing")
