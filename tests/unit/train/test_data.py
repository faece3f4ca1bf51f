"""Dataset loading and the three sharding strategies."""

import json
from pathlib import Path

import pytest

from train_jobs.corpus.generate import generate
from train_jobs.data import bundled_dataset_path, load_records, shard_indices


def test_bundled_dataset_is_the_generated_one() -> None:
    lines = bundled_dataset_path().read_text().splitlines()
    assert [json.loads(line) for line in lines] == generate()
    assert len(lines) == 400


def test_load_jsonl_and_text(tmp_path: Path) -> None:
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"instruction": "hi", "response": "there"}\n{"text": "free text"}\n')
    assert load_records(jsonl)[1] == {"text": "free text"}
    text = tmp_path / "d.txt"
    text.write_text("one paragraph\n\nanother one\n")
    assert load_records(text) == [{"text": "one paragraph"}, {"text": "another one"}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "?"}\n{"text": "x"}\n')
    with pytest.raises(ValueError, match="instruction"):
        load_records(bad)


@pytest.mark.parametrize("strategy", ["round_robin", "hash", "random"])
def test_every_example_lands_in_exactly_one_shard(strategy: str) -> None:
    keys = [f"example {i}" for i in range(103)]
    shards = shard_indices(keys, 4, strategy, seed=1)  # type: ignore[arg-type]
    assert sorted(i for shard in shards for i in shard) == list(range(103))
    assert shards == shard_indices(keys, 4, strategy, seed=1)  # type: ignore[arg-type]


def test_round_robin_and_random_are_balanced() -> None:
    keys = [str(i) for i in range(10)]
    assert shard_indices(keys, 3, "round_robin") == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert sorted(len(s) for s in shard_indices(keys, 3, "random", seed=3)) == [3, 3, 4]
    assert shard_indices(keys, 3, "random", seed=3) != shard_indices(keys, 3, "random", seed=4)


def test_hash_sharding_follows_the_example_not_its_position() -> None:
    keys = [f"text {i}" for i in range(50)]
    forward = shard_indices(keys, 3, "hash")
    backward = shard_indices(keys[::-1], 3, "hash")
    shard_of = {keys[i]: n for n, shard in enumerate(forward) for i in shard}
    shard_of_reversed = {keys[::-1][i]: n for n, shard in enumerate(backward) for i in shard}
    assert shard_of == shard_of_reversed


def test_bad_shard_count() -> None:
    with pytest.raises(ValueError):
        shard_indices(["a"], 0, "hash")
