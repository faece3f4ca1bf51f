"""`ray job submit` after `make run` (issue 27): a head started as `solanalm up` starts it, from a shell
whose PATH has no venv (make run calls .venv/bin/solanalm without activating it), then the documented
commands (README "Jobs", docs/operations.md) submit both training jobs through the job server to
SUCCEEDED; and `solanalm mcp` (stdio) submits a sharding job and a training run through the same server.

`.venv/bin/` in the docs is this interpreter's bin directory here (the same directory in a checkout).
"""

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from mcp import Client, StdioServerParameters

from cluster.config.serving import RaySection
from cluster.ray_cluster import head_launch, port_in_use
from tests.integration.security._heads import Head, clean_env, free_port

VENV_BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[3]
JOB_CPUS = 8  # logical: both jobs at once (2 DDP workers, 3 Flower clients) on the shared 2-core machine


@dataclass
class JobsHead:
    head: Head
    env: dict[str, str]  # a newcomer's shell: no venv on PATH, SolanaLM settings for this head's ports

    @property
    def jobs_url(self) -> str:
        return self.head.dashboard


def _shell_without_venv(home: Path, settings_env: dict[str, str]) -> dict[str, str]:
    env = clean_env(home, settings_env, fast_fail=False)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if Path(p) != VENV_BIN)
    env.pop("VIRTUAL_ENV", None)
    env.pop("PYTHONPATH", None)  # `--working-dir .` is what gives the job the code
    return env


@pytest.fixture(scope="module")
def jobs_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JobsHead]:
    base = tmp_path_factory.mktemp("jobs-head")
    ports = {"head_port": free_port(), "dashboard_port": free_port(), "client_server_port": free_port()}
    settings_env = {f"SOLANALM_RAY__{k.upper()}": str(v) for k, v in ports.items()}
    settings_env["SOLANALM_MODEL__CACHE_DIR"] = str(base / "cache")
    (base / "home").mkdir()
    shell = _shell_without_venv(base / "home", settings_env)
    section = RaySection.model_validate({**ports, "namespace": "solanalm-jobs"})
    command, env = head_launch(section, JOB_CPUS, base / "cache" / "state")  # what `solanalm up` runs
    temp_dir = Path(tempfile.mkdtemp(prefix="slmj", dir="/tmp"))
    command += ["--block", f"--temp-dir={temp_dir}", f"--dashboard-agent-listen-port={free_port()}"]
    log = base / "head.log"
    process = subprocess.Popen(
        command, env={**shell, **env}, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )
    head = Head(section, base / "cache" / "state", env, temp_dir, process, log)
    deadline = time.monotonic() + 120
    while not (port_in_use("127.0.0.1", section.head_port) and port_in_use("127.0.0.1", section.dashboard_port)):
        if process.poll() is not None or time.monotonic() > deadline:
            head.stop()
            raise RuntimeError(f"the Ray head did not come up:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    try:
        yield JobsHead(head, shell)
    finally:
        head.stop()


def _documented(jobs: JobsHead, entry: str) -> subprocess.Popen[str]:
    script = (
        f'eval "$({VENV_BIN}/solanalm ray-env)"\n'
        f"export RAY_ADDRESS={jobs.jobs_url}\n"
        f"{VENV_BIN}/ray job submit --working-dir . -- {entry}\n"
    )
    return subprocess.Popen(
        ["bash", "-c", script], cwd=REPO, env=jobs.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


@pytest.mark.slow  # a head and two training jobs at once: ~2-3 min on the shared 2-core machine
def test_documented_job_commands_run_both_training_jobs_to_succeeded(jobs_head: JobsHead) -> None:
    assert subprocess.run(["bash", "-c", "command -v python"], env=jobs_head.env, capture_output=True).stdout.strip()
    assert str(VENV_BIN) not in jobs_head.env["PATH"]  # the newcomer's shell: the fix is in the head's PATH
    runs = {
        "dp": _documented(jobs_head, "python -m train_jobs.data_parallel --config configs/train/dp-tiny.yaml"),
        "fl": _documented(jobs_head, "python -m train_jobs.federated --config configs/train/fl-tiny-dp.yaml"),
    }
    outputs = {name: run.communicate(timeout=600)[0] for name, run in runs.items()}
    for name, run in runs.items():
        tail = outputs[name][-4000:]
        assert run.returncode == 0, f"{name}:\n{tail}"
        assert "succeeded" in outputs[name] and "ModuleNotFoundError" not in outputs[name], f"{name}:\n{tail}"
    assert "[ROUND 2/2]" in outputs["fl"] or "ROUND 2" in outputs["fl"], outputs["fl"][-3000:]


def _mcp_server(jobs: JobsHead) -> StdioServerParameters:
    env = {**jobs.env, "PATH": f"{VENV_BIN}{os.pathsep}{jobs.env['PATH']}", "PYTHONPATH": str(REPO)}
    args = ["mcp", "--jobs-address", jobs.jobs_url, "--url", "http://127.0.0.1:9/v1", "--working-dir", str(REPO)]
    return StdioServerParameters(command=str(VENV_BIN / "solanalm"), args=args, env=env, cwd=str(REPO))


def _payload(result: object) -> dict:
    assert not result.is_error, result.content[0].text  # type: ignore[attr-defined]
    return dict(result.structured_content)  # type: ignore[attr-defined]


async def _shard_and_train(jobs: JobsHead) -> dict:
    async with Client(_mcp_server(jobs), read_timeout_seconds=120) as client:
        shard = _payload(await client.call_tool("llm_data_shard", {"num_shards": 3, "strategy": "hash"}))
        train = _payload(
            await client.call_tool(
                "llm_train_distributed",
                {"mode": "data_parallel", "config": "configs/train/dp-tiny.yaml", "num_workers": 1},
            )
        )
        bad = await client.call_tool("llm_train_distributed", {"mode": "federated", "config": "../etc/passwd"})
        missing = await client.call_tool("llm_data_shard", {"num_shards": 0})
        deadline = time.monotonic() + 240
        status = _payload(await client.call_tool("llm_job_status", {"job_id": shard["job_id"]}))
        while status["status"] not in ("SUCCEEDED", "FAILED", "STOPPED") and time.monotonic() < deadline:
            await asyncio.sleep(2)
            status = _payload(await client.call_tool("llm_job_status", {"job_id": shard["job_id"]}))
        listed = json.loads((await client.read_resource("training://jobs")).contents[0].text)
        shards = json.loads((await client.read_resource("training://data_shards")).contents[0].text)
        one = json.loads((await client.read_resource(f"training://jobs/{train['job_id']}")).contents[0].text)
        return {
            "shard": shard,
            "train": train,
            "bad": bad,
            "missing": missing,
            "status": status,
            "listed": listed,
            "shards": shards,
            "one": one,
        }


@pytest.mark.slow  # the same head; a sharding job to SUCCEEDED and a training run submitted (~40 s)
def test_mcp_stdio_submits_sharding_and_training_jobs_and_reads_their_progress(jobs_head: JobsHead) -> None:
    seen = asyncio.run(_shard_and_train(jobs_head))
    assert seen["shard"]["job_id"] and seen["train"]["job_id"] != seen["shard"]["job_id"]
    assert seen["status"]["status"] == "SUCCEEDED", seen["status"]["log_tail"]
    assert seen["bad"].is_error and "relative to the repository root" in seen["bad"].content[0].text
    assert seen["missing"].is_error and "num_shards" in seen["missing"].content[0].text
    ids = {row["job_id"]: row for row in seen["listed"]}
    assert ids[seen["shard"]["job_id"]]["kind"] == "shard" and ids[seen["train"]["job_id"]]["kind"] == "train_dp"
    (manifest,) = [m for m in seen["shards"] if m["name"] in seen["shard"]["output_dir"]]
    assert manifest["num_shards"] == 3 and sum(s["examples"] for s in manifest["shards"]) == manifest["examples"]
    assert seen["one"]["status"] in ("PENDING", "RUNNING", "SUCCEEDED") and "log_tail" in seen["one"]
