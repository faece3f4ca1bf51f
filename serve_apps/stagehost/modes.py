"""A provider node's mode: serving stages, training (a Flower SuperNode), or both (hybrid).

`split_resources` and `transition` are pure: what each mode gives serving and training, and the ordered
steps from what runs now to a target mode. `ModeController` runs those steps against two injected sides
(the stage host with its registration, the training process), one switch at a time in a background
thread, so a control call returns at once and `status()` shows the switch as it goes.

The order is what keeps requests from being lost: to training, the stages are drained first (the node
tells the registry it is draining, so the operator re-plans its layers onto other nodes and its old
replicas finish their sequences; only then are the stages dropped); leaving training, the SuperNode
finishes the round in progress before it stops, and only then do the stages register again. Serving has
priority in hybrid mode: the stage host's threads are cut to its share before training starts, and
training runs with the rest.
"""

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal, Protocol, get_args

from cluster.config.provider import HybridSection, NodeMode

logger = logging.getLogger(__name__)
MODES: tuple[NodeMode, ...] = get_args(NodeMode)
Step = Literal["drain_stages", "stop_training", "set_serve_threads", "start_training", "register_stages"]


class ModeError(RuntimeError):
    """A switch that cannot run (another is in progress, no training configured, a side failed)."""


@dataclass(frozen=True, slots=True)
class ResourceSplit:
    """Torch threads of the stage host and of the training process (0: that side does not run)."""

    serve_threads: int
    train_threads: int


@dataclass(frozen=True, slots=True)
class NodeState:
    """What runs on the node now."""

    serving: bool  # stages registered, Loads taken
    training: bool  # the SuperNode runs
    serve_threads: int
    train_threads: int


def split_resources(cpus: int, mode: NodeMode, hybrid: HybridSection) -> ResourceSplit:
    """The threads each side gets on `cpus` CPUs. Hybrid: training takes `train_threads` (or
    `train_cpu_fraction` of the CPUs, at least one) but never what would leave serving fewer than
    `min_serve_threads`; on a machine too small to split, both share it (training at a lower priority)."""
    if cpus < 1:
        raise ValueError(f"cpus must be at least 1, not {cpus}")
    if mode == "serving":
        return ResourceSplit(cpus, 0)
    if mode == "training":
        return ResourceSplit(0, cpus)
    serve_floor = min(hybrid.min_serve_threads, cpus)
    wanted = hybrid.train_threads or max(1, int(cpus * hybrid.train_cpu_fraction))
    train = min(wanted, cpus - serve_floor)
    if train < 1:  # one CPU, or min_serve_threads takes them all: share, training niced
        return ResourceSplit(cpus, 1)
    return ResourceSplit(cpus - train, train)


def transition(current: NodeState, target: NodeMode, split: ResourceSplit) -> list[Step]:
    """The steps from `current` to `target` with `split`, in the order they must run."""
    if target not in MODES:
        raise ValueError(f"mode {target!r} is not one of {MODES}")
    want_serving, want_training = split.serve_threads > 0, split.train_threads > 0
    steps: list[Step] = []
    if current.serving and not want_serving:
        steps.append("drain_stages")  # before training starts: the stages' requests move first
    restart = current.training and want_training and current.train_threads != split.train_threads
    if current.training and (not want_training or restart):
        steps.append("stop_training")  # after the round in progress
    if want_serving and current.serve_threads != split.serve_threads:
        steps.append("set_serve_threads")  # serving's share is set before training takes the rest
    if want_training and (restart or not current.training):
        steps.append("start_training")
    if want_serving and not current.serving:
        steps.append("register_stages")
    return steps


class StageSide(Protocol):
    """The stage host and its registration, as the controller drives them."""

    def drain(self, timeout_s: float) -> bool:
        """Refuse new Loads, tell the registry this node drains, wait for the coordinators' streams to
        close (True) or `timeout_s` (False), then drop the stages."""
        ...

    def register(self) -> None:
        """Take Loads again and register with the registry (not draining)."""
        ...

    def set_threads(self, threads: int) -> None: ...

    def describe(self) -> dict[str, Any]:
        """Loaded stages, open streams and the like, for status."""
        ...


class TrainingSide(Protocol):
    """The training process (a SuperNode)."""

    configured: bool

    def start(self, threads: int) -> None: ...

    def stop(self, timeout_s: float) -> bool:
        """Stop after the round in progress (True) or at `timeout_s` (False, the round is abandoned)."""
        ...

    def running(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class ModeStatus:
    """What `provider status` shows."""

    mode: NodeMode  # the mode reached last
    target: NodeMode  # the mode being switched to (== mode when settled)
    phase: str  # "settled" or the step running
    serving: bool
    training: bool
    serve_threads: int
    train_threads: int
    cpus: int
    error: str | None = None
    switched_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class ModeController:
    """Switches the node's mode, one switch at a time, each in a background thread."""

    def __init__(
        self,
        stages: StageSide,
        training: TrainingSide,
        cpus: int,
        hybrid: HybridSection,
        drain_timeout_s: float,
        round_timeout_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.stages, self.training = stages, training
        self.cpus, self.hybrid = cpus, hybrid
        self.drain_timeout_s, self.round_timeout_s = drain_timeout_s, round_timeout_s
        self._clock = clock
        split = split_resources(cpus, "serving", hybrid)
        self._state = NodeState(serving=True, training=False, serve_threads=split.serve_threads, train_threads=0)
        self._status = ModeStatus("serving", "serving", "settled", True, False, split.serve_threads, 0, cpus)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def status(self) -> ModeStatus:
        with self._lock:
            return replace(self._status, training=self.training.running() if self._state.training else False)

    def describe(self) -> dict[str, Any]:
        """Status plus what the stage host reports."""
        return {**self.status().to_json(), "stage_host": self.stages.describe()}

    def switch(self, target: NodeMode, wait: bool = False) -> ModeStatus:
        """Start switching to `target` (ModeError when a switch runs or training is not configured)."""
        if target not in MODES:
            raise ModeError(f"mode {target!r} is not one of {MODES}")
        split = split_resources(self.cpus, target, self.hybrid)
        if split.train_threads and not self.training.configured:
            raise ModeError("this node has no training configured (serve with --train-superlink and --train-data)")
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                raise ModeError(f"a switch to {self._status.target} is in progress ({self._status.phase})")
            steps = transition(self._state, target, split)
            self._status = replace(self._status, target=target, phase="settled" if not steps else steps[0], error=None)
            self._thread = threading.Thread(
                target=self._run, args=(target, split, steps), name=f"mode-{target}", daemon=True
            )
            self._thread.start()
        if wait:
            self.join()
        return self.status()

    def join(self, timeout_s: float | None = None) -> None:
        thread = self._thread
        if thread is not None:
            thread.join(timeout_s)

    def _run(self, target: NodeMode, split: ResourceSplit, steps: list[Step]) -> None:
        try:
            for step in steps:
                self._set(phase=step)
                logger.info("mode %s: %s", target, step)
                self._do(step, split)
            with self._lock:
                self._status = replace(self._status, mode=target, phase="settled", switched_at=self._clock())
            logger.info("node is in %s mode (%s)", target, split)
        except Exception as exc:  # noqa: BLE001 - reported in status; the node keeps what it reached
            logger.exception("switch to %s failed", target)
            self._set(phase="failed", error=f"{type(exc).__name__}: {exc}")

    def _do(self, step: Step, split: ResourceSplit) -> None:
        state = self._state
        if step == "drain_stages":
            if not self.stages.drain(self.drain_timeout_s):
                logger.warning(
                    "drain timed out after %.0f s: the operator fails over what is left", self.drain_timeout_s
                )
            state = replace(state, serving=False, serve_threads=0)
        elif step == "stop_training":
            if not self.training.stop(self.round_timeout_s):
                logger.warning("the training round did not finish in %.0f s; stopped anyway", self.round_timeout_s)
            state = replace(state, training=False, train_threads=0)
        elif step == "set_serve_threads":
            self.stages.set_threads(split.serve_threads)
            state = replace(state, serve_threads=split.serve_threads)
        elif step == "start_training":
            self.training.start(split.train_threads)
            state = replace(state, training=True, train_threads=split.train_threads)
        elif step == "register_stages":
            self.stages.register()
            state = replace(state, serving=True)
        self._state = state
        self._set(
            serving=state.serving,
            training=state.training,
            serve_threads=state.serve_threads,
            train_threads=state.train_threads,
        )

    def _set(self, **changes: Any) -> None:
        with self._lock:
            self._status = replace(self._status, **changes)
