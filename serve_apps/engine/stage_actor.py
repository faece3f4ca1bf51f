"""The Ray actor of one stage, created by the replica inside its placement-group bundle."""

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import ray

from serve_apps import metrics
from serve_apps.engine.links import Address, StageLink
from serve_apps.engine.messages import StageInfo, StepBatch, StepResult
from serve_apps.engine.stage_worker import StageConfig, StageWorker

T = TypeVar("T")


@ray.remote(max_restarts=0, max_concurrency=1)  # type: ignore[call-overload]
class StageActor:
    """Holds one stage's layers and KV cache in its own process; steps run one at a time, in order.

    Every torch computation (loading, steps from any transport) runs on one compute thread.
    With OpenMP, each thread that runs parallel work keeps its own team of worker threads, and libgomp
    stops spinning and sleeps between parallel regions as soon as all teams together hold more threads
    than there are CPUs: a stage loaded on Ray's main thread and stepped on a link's thread ran a decode
    step of SmolLM2 in 28 ms instead of 14 (2 threads, measured). One thread, one team, full speed.
    """

    def __init__(self, config: StageConfig) -> None:
        self._compute_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stage-compute")
        self.worker = self._on_compute_thread(StageWorker, config)
        self._metric_model = metrics.stage_model_label(config.actor_name, config.model_dir)
        self._link: StageLink | None = None

    def _on_compute_thread(self, fn: Callable[..., T], *args: object) -> T:
        return self._compute_thread.submit(fn, *args).result()

    def forward(self, batch: StepBatch, hidden=None):  # type: ignore[no-untyped-def]
        """Hidden states in (an ObjectRef resolved by Ray from the previous stage), hidden or tokens out."""
        return self._on_compute_thread(self._compute, batch, hidden)

    def _compute(self, batch: StepBatch, hidden):  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        out = self.worker.forward(batch, hidden)
        metrics.record_stage_forward(self._metric_model, self.worker.spec.index, time.perf_counter() - started)
        return out

    def link(self, downstream: Address, token: bytes) -> Address:
        """Direct transport: drop the previous link, connect to `downstream` and return where the upstream
        stage (or the replica) connects; its steps run on the compute thread (see serve_apps.engine.links)."""
        if self._link is not None:
            self._link.close()
        host, to = ray.util.get_node_ip_address(), (str(downstream[0]), int(downstream[1]))
        self._link = StageLink(self.forward, host, to, token, config=self.worker.config)
        return self._link.address

    def describe(self) -> StageInfo:
        return self.worker.describe()

    def ping(self) -> bool:
        return True


def stage_actor_options(resources: dict[str, float]) -> dict[str, object]:
    """Ray actor options that request exactly one stage bundle's resources."""
    custom = {key: value for key, value in resources.items() if key not in ("CPU", "GPU", "memory")}
    options: dict[str, object] = {"num_cpus": resources.get("CPU", 0.0), "num_gpus": resources.get("GPU", 0.0)}
    if custom:
        options["resources"] = custom
    if resources.get("memory"):
        options["memory"] = resources["memory"]
    return options


def torch_threads_for(resources: dict[str, float]) -> int:
    """Intra-op threads of a stage: its bundle's CPUs (at least one)."""
    return max(1, int(resources.get("CPU", 1.0)))


__all__ = ["StageActor", "StepResult", "stage_actor_options", "torch_threads_for"]
