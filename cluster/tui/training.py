"""The TUI's training and log sources over a live cluster.

Training state is read by the one reader the project has, `serve_apps.mcp.jobs.TrainingJobs` (Ray's job
server: jobs, status, progress lines; the training output directory: each federated run's summary.json with
rounds, loss, ε and rewards). `solanalm tui` is an entry point at the top, like the CLI's plugins, so it may
import it (lazily, here only); the rest of `cluster` does not. Logs are the JSON lines under the connected
Ray session's logs directory (cluster.observability.logs.LogTail).
"""

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.observability.logs import LogEntry, LogTail
from cluster.tui.snapshot import TrainingSnapshot, jobs_from, rewards_from, rounds_from

logger = logging.getLogger(__name__)


def session_logs_dir() -> Path | None:
    """The logs directory of the Ray session this driver is connected to (None when not connected)."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    return Path(node.get_logs_dir_path()) if node is not None else None


@dataclass
class TailLogSource:
    """New JSON log entries of `directory` (and below), oldest first."""

    directory: Path

    def __post_init__(self) -> None:
        self._tail = LogTail(self.directory)

    def read_new(self) -> list[LogEntry]:
        return self._tail.read_new()


def dashboard_address() -> str | None:
    """The job server (dashboard) of the cluster this driver is connected to, as http://host:port."""
    import ray

    url = ray._private.worker.get_dashboard_url() if ray.is_initialized() else None
    return None if not url else (url if url.startswith("http") else f"http://{url}")


@dataclass
class JobsTrainingSource:
    """Training jobs (job server at `address()`) and run summaries (under `output_dir`)."""

    output_dir: Path
    address: Any = dashboard_address  # Callable[[], str | None]
    working_dir: Path = field(default_factory=Path.cwd)

    def __post_init__(self) -> None:
        from serve_apps.mcp.jobs import JobsConfig, TrainingJobs

        self._jobs = TrainingJobs(JobsConfig(self.address, self.working_dir, self.output_dir))

    def read(self) -> TrainingSnapshot:
        from serve_apps.mcp.jobs import JobsUnavailable

        notes = []
        try:
            jobs = jobs_from(asyncio.run(self._jobs.metrics()))
        except JobsUnavailable as exc:
            jobs = []
            notes.append(f"jobs: {str(exc)[:160]}")
        summaries = self._jobs.run_summaries()
        if not summaries:
            notes.append(f"no federated run summaries under {self.output_dir}")
        return TrainingSnapshot(
            tuple(jobs), tuple(rounds_from(summaries)), tuple(rewards_from(summaries)), tuple(notes)
        )
