"""The two sides a provider node's ModeController drives: its stage host with its registration, and its
training process (`solanalm provider train`, a Flower SuperNode, started as a command so this package
imports nothing of train_jobs)."""

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)
ROUND_FILE = "round-in-progress"  # the ClientApp holds it while it trains a round (train_jobs.fl_client)
POLL_S = 0.2


class HostStages:
    """StageSide over a StageHostServer and the ProviderAgent that registered it."""

    def __init__(self, server: Any, agent: Any, poll_s: float = POLL_S) -> None:
        self.server, self.agent, self.poll_s = server, agent, poll_s

    def drain(self, timeout_s: float) -> bool:
        self.server.set_draining(True)
        self.agent.drain()  # the registry marks the node draining: the operator re-plans its layers elsewhere
        deadline = time.monotonic() + timeout_s
        while self.server.open_streams > 0 and time.monotonic() < deadline:
            time.sleep(self.poll_s)
        drained = self.server.open_streams == 0
        self.server.drop_all("the node drained for training")
        return drained

    def register(self) -> None:
        self.server.set_draining(False)
        self.agent.register()

    def set_threads(self, threads: int) -> None:
        self.server.set_threads(threads)

    def describe(self) -> dict[str, Any]:
        return {
            "draining": self.server.draining,
            "stages": len(self.server.stages),
            "open_streams": self.server.open_streams,
        }


@dataclass(frozen=True, slots=True)
class TrainingOptions:
    """What `provider train` needs (from `provider serve --train-*`)."""

    superlink: str
    wallet: Path
    data: Path
    ca_cert: Path
    state_dir: Path
    runtime_port: int = 9094


class SuperNodeProcess:
    """TrainingSide: `solanalm provider train` in its own process group, its torch threads and OpenMP team
    capped, niced below the stage host. `stop` waits for the round file to go (the round in progress ends),
    then SIGTERMs the group."""

    def __init__(
        self,
        options: TrainingOptions | None,
        nice: int = 10,
        command: Callable[[TrainingOptions, int], list[str]] | None = None,
        poll_s: float = POLL_S,
    ) -> None:
        self.options, self.nice, self.poll_s = options, nice, poll_s
        self._command = command or train_command
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def configured(self) -> bool:
        return self.options is not None

    @property
    def round_file(self) -> Path | None:
        return None if self.options is None else self.options.state_dir.expanduser() / ROUND_FILE

    def start(self, threads: int) -> None:
        if self.options is None:
            raise RuntimeError("no training configured")
        threads_env = {name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
        env = {**os.environ, **threads_env}
        nice = self.nice
        self.process = subprocess.Popen(
            self._command(self.options, threads),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,  # the key binding is also written to its state directory
            start_new_session=True,
            preexec_fn=(lambda: os.nice(nice)) if nice else None,  # noqa: PLW1509 - nice only, no threads yet
        )
        logger.info("training process %d started with %d threads", self.process.pid, threads)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout_s: float) -> bool:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return True
        deadline = time.monotonic() + timeout_s
        round_file = self.round_file
        while round_file is not None and round_file.exists() and time.monotonic() < deadline:
            if process.poll() is not None:
                break
            time.sleep(self.poll_s)
        finished = round_file is None or not round_file.exists()
        _stop_group(process)
        if round_file is not None:
            round_file.unlink(missing_ok=True)
        return finished


def train_command(options: TrainingOptions, threads: int) -> list[str]:
    """`solanalm provider train ...` of this environment with `threads` torch threads."""
    solanalm = Path(sys.executable).with_name("solanalm")
    return [
        str(solanalm),
        "provider",
        "train",
        "--superlink",
        options.superlink,
        "--wallet",
        str(options.wallet),
        "--data",
        str(options.data),
        "--ca-cert",
        str(options.ca_cert),
        "--state-dir",
        str(options.state_dir),
        "--runtime-port",
        str(options.runtime_port),
        "--torch-threads",
        str(threads),
    ]


def _stop_group(process: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
