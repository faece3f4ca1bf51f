"""Training and sharding as Ray jobs, through Ray's job server (`JobSubmissionClient`).

The tools submit the entry points that exist (`python -m train_jobs.data_parallel|federated|shard`) with
the repository as the job's working directory, exactly as `ray job submit --working-dir .` does; the
resources read the job server back (status, log tail) and the training output directory (checkpoints,
shards). The SDK is synchronous: every call runs in a thread.
"""

import asyncio
import json
import logging
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

KIND_KEY = "solanalm_kind"  # job metadata: which tool submitted it (train_dp, train_fl, shard)
LOG_TAIL_LINES = 40
PROGRESS_MARKERS = ("[ROUND", "epsilon", "ε", "loss", "finished", "shard", "step")


class JobsUnavailable(RuntimeError):
    """No job server can be reached (or it refused this client); the message says what to do."""


@dataclass(frozen=True, slots=True)
class JobsConfig:
    """Where jobs go and what they upload; `address` is resolved at call time (a replica learns it late)."""

    address: Callable[[], str | None]  # http://host:8265 of the job server, None when there is none
    working_dir: Path  # uploaded as the job's working directory (the repository root)
    output_dir: Path  # training.output_dir: checkpoints and shards are found under it


class TrainingJobs:
    """Submit and read back SolanaLM's Ray jobs."""

    def __init__(self, config: JobsConfig) -> None:
        self.config = config
        self._client: Any = None
        self._client_address: str | None = None

    def _sdk(self) -> Any:
        from ray.job_submission import JobSubmissionClient

        address = self.config.address()
        if not address:
            raise JobsUnavailable(
                "no Ray job server is known here: start the cluster with `solanalm up` (its head runs the job "
                "server on the dashboard port) or pass --jobs-address http://HOST:8265"
            )
        if self._client is None or self._client_address != address:
            try:
                self._client = JobSubmissionClient(address)
            except Exception as exc:  # noqa: BLE001 - the SDK raises ConnectionError/RuntimeError/ValueError
                raise JobsUnavailable(f"cannot reach the Ray job server at {address}: {exc}") from exc
            self._client_address = address
        return self._client

    async def _run(self, fn: Callable[[Any], Any]) -> Any:
        def call() -> Any:
            client = self._sdk()
            try:
                return fn(client)
            except JobsUnavailable:
                raise
            except RuntimeError as exc:  # the SDK's HTTP errors (404 unknown job, 401 no token)
                raise JobsUnavailable(str(exc).strip()[:500]) from exc
            except OSError as exc:
                raise JobsUnavailable(f"the Ray job server at {self._client_address} failed: {exc}") from exc

        return await asyncio.to_thread(call)

    async def submit(self, kind: str, args: list[str]) -> dict[str, Any]:
        """Submit `python -m <args>` as a job; its id and first status."""
        entrypoint = "python -m " + " ".join(shlex.quote(arg) for arg in args)
        runtime_env = {"working_dir": str(self.config.working_dir)}
        job_id = await self._run(
            lambda c: c.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, metadata={KIND_KEY: kind})
        )
        logger.info("submitted %s job %s: %s", kind, job_id, entrypoint)
        return {"job_id": job_id, "status": await self._run(lambda c: str(c.get_job_status(job_id).value))}

    async def status(self, job_id: str) -> dict[str, Any]:
        """Status, message and progress (the log lines that report rounds, steps, loss, ε) of one job."""
        info = await self._run(lambda c: c.get_job_info(job_id))
        logs = await self._run(lambda c: c.get_job_logs(job_id))
        lines = logs.splitlines()
        return {
            **_info(info),
            "progress": [line for line in lines if any(m in line for m in PROGRESS_MARKERS)][-LOG_TAIL_LINES:],
            "log_tail": lines[-LOG_TAIL_LINES:],
        }

    async def list_jobs(self, kinds: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
        """Every job on the server (or those submitted by these tools' kinds), newest first."""
        jobs = await self._run(lambda c: c.list_jobs())
        rows = [_info(job) for job in jobs]
        if kinds is not None:
            rows = [row for row in rows if row["kind"] in kinds]
        return sorted(rows, key=lambda row: row["start_time"] or 0, reverse=True)

    async def metrics(self) -> list[dict[str, Any]]:
        """Per training job: status, duration and the progress lines of its log."""
        rows = []
        for row in await self.list_jobs(("train_dp", "train_fl")):
            detail = await self.status(row["job_id"])
            rows.append({**row, "progress": detail["progress"]})
        return rows

    def checkpoints(self) -> list[dict[str, Any]]:
        """Checkpoint directories under the training output directory (Ray Train and Flower runs)."""
        root = self.config.output_dir.expanduser()
        found = sorted(p for p in root.glob("*/**/checkpoint*") if p.is_dir()) if root.exists() else []
        return [{"run": p.relative_to(root).parts[0], "path": str(p), "mtime": p.stat().st_mtime} for p in found]

    def run_summaries(self) -> list[dict[str, Any]]:
        """Federated runs' `summary.json` (rounds: loss, ε per client, rewards per wallet) under the training
        output directory, each with its `run` (directory name), oldest first; unreadable ones are skipped."""
        root = self.config.output_dir.expanduser()
        paths = sorted(root.glob("*/summary.json"), key=lambda p: p.stat().st_mtime) if root.exists() else []
        summaries = []
        for path in paths:
            try:
                summary = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as exc:  # a run writing it right now
                logger.info("skipping %s: %s", path, exc)
                continue
            if isinstance(summary, dict):
                summaries.append({"run": path.parent.name, **summary})
        return summaries

    def data_shards(self) -> list[dict[str, Any]]:
        """Shard sets written by `llm_data_shard` jobs (their manifest.json)."""
        root = self.config.output_dir.expanduser() / "shards"
        manifests = sorted(root.glob("*/manifest.json")) if root.exists() else []
        return [json.loads(path.read_text()) for path in manifests]


def _info(info: Any) -> dict[str, Any]:
    metadata = info.metadata or {}
    start, end = info.start_time, info.end_time
    return {
        "job_id": info.submission_id or info.job_id,
        "kind": metadata.get(KIND_KEY),
        "status": str(getattr(info.status, "value", info.status)),
        "message": info.message,
        "entrypoint": info.entrypoint,
        "start_time": start,
        "end_time": end,
        "duration_s": round((end - start) / 1000, 1) if start and end else None,
    }
