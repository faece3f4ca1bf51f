"""2 Flower rounds on the shared Ray cluster: 3 clients, DP-SGD on, one client drops in round 2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import yaml

pytestmark = pytest.mark.usefixtures("ray_cluster")


def test_federated_dp_rounds_with_rewards(tmp_path: Path, model_cache_dir: Path, repo_root: Path) -> None:
    job = {
        "name": "fl-test",
        "model": {
            "name": "tiny-llama",
            "catalogue": str(repo_root / "configs/models.yaml"),
            "cache_dir": str(model_cache_dir),
        },
        "data": {"max_length": 24, "max_examples": 120},
        "optim": {"learning_rate": 2e-2, "batch_size": 8, "max_steps": 4},
        "lora": {
            "r": 8,
            "alpha": 16,
            "target_modules": ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
        },
        "privacy": {"enabled": True, "noise_multiplier": 0.8, "max_grad_norm": 1.0, "delta": 1e-5},
        "num_clients": 3,
        "num_rounds": 2,
        "min_train_clients": 3,
        "min_available_clients": 3,
        "client_resources": {"num_cpus": 8, "torch_threads": 1},
        "simulate_drops": {2: [2]},
        "storage_path": str(tmp_path),
    }
    config = tmp_path / "fl-test.yaml"
    config.write_text(yaml.safe_dump(job))
    address = ray.get_runtime_context().gcs_address
    # Flower ends with ray.shutdown(); a subprocess keeps that away from the shared session cluster.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "train_jobs.federated",
            "--config",
            str(config),
            "--ray-address",
            address,
            "--namespace",
            "solanalm-test",
        ],
        capture_output=True,
        text=True,
        timeout=420,
        cwd=repo_root,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_dir = tmp_path / "fl-test"
    summary = json.loads((run_dir / "summary.json").read_text())
    first, second = summary["rounds"]

    # Loss goes down on the held-out set (centralised evaluation of the global adapter).
    assert second["eval_loss"] < summary["eval_loss_before"]
    # Epsilon is cumulative: a client in both rounds has spent more after round 2.
    for wallet in second["completed"]:
        assert second["client_epsilon"][wallet] > first["client_epsilon"][wallet] > 0
    # The dropped client is named, and its reward is zero; the others are paid per example.
    assert len(second["dropped"]) == 1 and len(second["completed"]) == 2
    rewards = [json.loads(line) for line in (run_dir / "rewards.jsonl").read_text().splitlines()]
    round2 = {r["wallet"]: r for r in rewards if r["round"] == 2}
    dropped = round2[second["dropped"][0]]
    assert dropped["dropped"] and dropped["amount_lamports"] == 0 and dropped["examples"] == 0
    paid = [r for r in rewards if not r["dropped"]]
    assert len(paid) == 5 and all(r["amount_lamports"] == r["examples"] * 1000 > 0 for r in paid)
    # Privacy parameters are stored with the adapter.
    privacy = json.loads((run_dir / "adapter" / "privacy.json").read_text())
    assert privacy["dp_sgd"]["noise_multiplier"] == 0.8 and privacy["spent"]["max_epsilon"] > 0
