"""The Ray actor of one stage, created by the replica inside its placement-group bundle."""

import threading
import time

import ray

from serve_apps import metrics
from serve_apps.engine.links import Address, StageLink
from serve_apps.engine.messages import StageInfo, StepBatch, StepResult
from serve_apps.engine.stage_worker import StageConfig, StageWorker


@ray.remote(max_restarts=0, max_concurrency=1)  # type: ignore[call-overload]
class StageActor:
    """Holds one stage's layers and KV cache in its own process; steps run one at a time, in order."""

    def __init__(self, config: StageConfig) -> None:
        self.worker = StageWorker(config)
        self._metric_model = metrics.stage_model_label(config.actor_name, config.model_dir)
        self._compute_lock = threading.Lock()  # steps from actor calls, a compiled graph or a direct link
        self._link: StageLink | None = None

    def forward(self, batch: StepBatch, hidden=None):  # type: ignore[no-untyped-def]
        """Hidden states in (an ObjectRef resolved by Ray from the previous stage), hidden or tokens out."""
        with self._compute_lock:
            return self._compute(batch, hidden)

    def _compute(self, batch: StepBatch, hidden):  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        out = self.worker.forward(batch, hidden)
        metrics.record_stage_forward(self._metric_model, self.worker.spec.index, time.perf_counter() - started)
        return out

    def link(self, downstream: Address, token: bytes) -> Address:
        """Direct transport: drop the previous link, connect to `downstream` and return where the upstream
        stage (or the replica) connects; steps then run on the link's thread (see serve_apps.engine.links)."""
        if self._link is not None:
            self._link.close()
        host, to = ray.util.get_node_ip_address(), (str(downstream[0]), int(downstream[1]))
        self._link = StageLink(self._compute, self._compute_lock, host, to, token)
        return self._link.address

    def describe(self) -> StageInfo:
        return self.worker.describe()

    def ping(self) -> bool:
        return True

    def trace(self, inputs, dims: int):  # type: ignore[no-untyped-def]
        """Verification: cache-free forward of a token history -> (output, fingerprint); see StageWorker.trace."""
        return self.worker.trace(inputs, dims)

    def inject_fault(self, stage_index: int, noise_scale: float, seed: int, node_label: str | None = None) -> bool:
        """TEST / CHAOS TOOL: perturb this stage's weights (see StageWorker.inject_fault)."""
        return self.worker.inject_fault(stage_index, noise_scale, seed, node_label)


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
