"""`python -m train_jobs.shard`: split a dataset into shards the way the training jobs do, as a Ray job.

Records load with `data.load_records` (JSONL or text; the bundled set by default) and split with
`data.shard_indices` (round_robin, hash, random), so a shard set here matches what DDP workers and Flower
clients see. Writes `<output>/shard-NNN.jsonl` and `<output>/manifest.json`; prints the manifest as JSON.
"""

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, get_args

from train_jobs.config import ShardingStrategy
from train_jobs.data import load_records, shard_indices


def write_shards(
    dataset: Path | None, num_shards: int, strategy: ShardingStrategy, seed: int, output: Path, name: str
) -> dict[str, Any]:
    """Shard `dataset` into `output`; the manifest (also written as manifest.json)."""
    records = load_records(dataset)
    keys = [record.get("text") or record.get("instruction", "") + record.get("response", "") for record in records]
    shards = shard_indices(keys, num_shards, strategy, seed)
    output.mkdir(parents=True, exist_ok=True)
    files = []
    for number, indices in enumerate(shards):
        path = output / f"shard-{number:03d}.jsonl"
        path.write_text("".join(json.dumps(records[i]) + "\n" for i in indices))
        files.append({"path": str(path), "examples": len(indices)})
    manifest = {
        "name": name,
        "dataset": str(dataset) if dataset else "bundled",
        "strategy": strategy,
        "seed": seed,
        "num_shards": num_shards,
        "examples": len(records),
        "shards": files,
        "created": time.time(),
    }
    (output / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=None, help="JSONL/text file (default: the bundled set).")
    parser.add_argument("--num-shards", type=int, required=True)
    parser.add_argument("--strategy", choices=get_args(ShardingStrategy), default="round_robin")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None, help="Directory (default: training.output_dir/shards).")
    parser.add_argument("--name", default=None, help="Shard set name (default: shards-<timestamp>).")
    args = parser.parse_args(argv)
    name = args.name or f"shards-{int(time.time())}"
    if args.output is None:
        from cluster.config import load_settings

        args.output = load_settings(None).training.output_dir.expanduser() / "shards" / name
    try:
        manifest = write_shards(args.dataset, args.num_shards, args.strategy, args.seed, args.output, name)
    except (OSError, ValueError) as exc:
        sys.exit(f"shard: {exc}")
    print(json.dumps(manifest))


if __name__ == "__main__":
    main()
