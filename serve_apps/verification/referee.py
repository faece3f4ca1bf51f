"""The referee: recompute one stage from the model's reference weights (a Ray task, off the gateway).

The referee trusts only the weights on disk (the operator's model cache, the same files every stage
loads) and the served pipeline's input to the stage, so it says which of two disagreeing pipelines is
wrong without trusting either.
"""

from pathlib import Path
from typing import Any

import torch

from cluster.network.registry import HEAD_NODE_RESOURCE
from serve_apps.engine.layer_split import StageSpec
from serve_apps.engine.stage_model import build_stage
from serve_apps.verification.protocol import TraceResult
from serve_apps.verification.trace import fingerprint, trace_forward


def reference_fingerprint(model_dir: str, spec: StageSpec, dtype: str, inputs: Any, dims: int) -> tuple[float, ...]:
    """Fingerprint of `spec`'s layers, loaded from `model_dir`, applied to `inputs` (cache-free)."""
    torch.set_num_threads(1)
    model = build_stage(Path(model_dir), spec, getattr(torch, dtype))
    return fingerprint(trace_forward(model, inputs), dims)


def stage_spec(index: int, layer_start: int, layer_end: int, num_stages: int) -> StageSpec:
    return StageSpec(index, layer_start, layer_end, first=index == 0, last=index == num_stages - 1)


async def run_referee(served: TraceResult, stage: int, dims: int, num_cpus: float = 1.0) -> tuple[float, ...]:
    """`reference_fingerprint` of the served pipeline's disputed stage on the served pipeline's input to it,
    as a Ray task on the head node: the operator's machine, never a provider's (the gateway itself may run
    on a provider node, and a provider must not referee itself)."""
    import ray

    if not served.inputs:
        raise ValueError("the served trace kept no stage inputs")
    trace = served.stages[stage]
    spec = stage_spec(trace.index, trace.layer_start, trace.layer_end, len(served.stages))
    task: Any = ray.remote(reference_fingerprint).options(num_cpus=num_cpus, resources={HEAD_NODE_RESOURCE: 0.001})
    result: tuple[float, ...] = await task.remote(served.model_dir, spec, served.dtype, served.inputs[stage], dims)
    return result
