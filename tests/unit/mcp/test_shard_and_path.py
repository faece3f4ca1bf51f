"""The sharding job's pure part and the head's PATH (what `ray job submit -- python` finds)."""

import json
import os
import sys
from pathlib import Path

from train_jobs.shard import write_shards


def test_write_shards_splits_every_example_once_and_writes_a_manifest(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"example {i}"}) + "\n" for i in range(10)))
    manifest = write_shards(data, 3, "round_robin", 0, tmp_path / "out", "s")
    assert [s["examples"] for s in manifest["shards"]] == [4, 3, 3]
    lines = [line for s in manifest["shards"] for line in Path(s["path"]).read_text().splitlines()]
    assert sorted(lines) == sorted(data.read_text().splitlines())
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["num_shards"] == 3


def test_the_head_runs_with_this_environments_bin_first_on_path(tmp_path: Path) -> None:
    from cluster.config.serving import RaySection
    from cluster.ray_cluster import head_launch

    _, env = head_launch(RaySection(auth="disabled"), 2, tmp_path)
    first, _, rest = env["PATH"].partition(os.pathsep)
    assert first == str(Path(sys.executable).parent) and rest == os.environ.get("PATH", "")
