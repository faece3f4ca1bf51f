"""The notebooks run end to end on the tiny model (nbclient, a subprocess kernel with its own Ray).

Each notebook ends by printing one JSON summary; the test checks it. The kernels start their own
local Ray (`ray.init(address="local")`), separate from the session fixture's; the two that do so
are marked slow (`-m "not slow"` skips them).
"""

import json
import os
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[3] / "notebooks"


def run_notebook(name: str, env: dict[str, str], timeout_s: int) -> dict:
    """Execute notebooks/<name> in a fresh kernel; the JSON its last cell printed."""
    book = nbformat.read(NOTEBOOKS / name, as_version=4)
    old = {key: os.environ.get(key) for key in env}
    os.environ.update(env)  # the kernel subprocess inherits the environment
    try:
        started = time.perf_counter()
        NotebookClient(
            book, timeout=timeout_s, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
        ).execute()
        print(f"{name}: {time.perf_counter() - started:.1f} s")
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    outputs = book.cells[-1].outputs
    text = "".join(output.get("text", "") for output in outputs if output.get("output_type") == "stream")
    return json.loads(text.strip().splitlines()[-1])


@pytest.fixture()
def nb_env(model_cache_dir: Path, repo_root: Path) -> dict[str, str]:
    return {
        "SOLANALM_NB_CACHE": str(model_cache_dir),
        "SOLANALM_REPO": str(repo_root),
        "SOLANALM_NB_MODEL": "tiny-llama",
        "SOLANALM_NB_STAGES": "1",  # one stage actor: the notebook's point is the path, not the sharding
    }


@pytest.mark.slow  # its own Ray head, a deployment and the payments actor: ~30-60 s
def test_quickstart_deploys_chats_and_reads_the_receipt(nb_env: dict[str, str]) -> None:
    summary = run_notebook("01_quickstart.ipynb", nb_env, timeout_s=240)
    assert summary["completion_tokens"] > 0
    assert summary["settlement_id"] and summary["receipt_id"] == summary["settlement_id"]
    assert summary["receipt_completion_tokens"] == summary["completion_tokens"]


@pytest.mark.slow  # its own Ray head and a Flower simulation: ~40-120 s
def test_federated_dp_notebook_trains_and_accounts_privacy(nb_env: dict[str, str]) -> None:
    summary = run_notebook("02_federated_dp.ipynb", nb_env, timeout_s=300)
    assert summary["rounds"] == 2
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    assert summary["max_epsilon"] > 0 and summary["delta"] == 1e-5
    assert summary["rewarded_examples"] > 0


def test_payments_audit_matches_ledger_and_chain(nb_env: dict[str, str]) -> None:
    summary = run_notebook("03_payments_audit.ipynb", nb_env, timeout_s=120)
    assert summary["payouts_confirmed"] == 2 and summary["amount_paid"] > 0
    assert summary["all_match"] and summary["reconcile_ok"]
    assert summary["pending_after"] == {} and summary["csv_rows"] >= 6
