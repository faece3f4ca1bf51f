"""The replica side of a trace: the history's token ids, then each stage's cache-free forward in order."""

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import torch

from serve_apps.engine.layer_split import StageSpec
from serve_apps.protocol import Rejected
from serve_apps.server.tokenization import PromptProcessor
from serve_apps.verification.protocol import StageTrace, TraceRequest, TraceResult

logger = logging.getLogger(__name__)


def history_token_ids(request: TraceRequest, prompts: PromptProcessor) -> tuple[int, ...]:
    """The token ids to trace: given ids, or the served prompt's ids followed by the completion's; cut to
    `max_tokens`. ValueError when the prompt is rejected."""
    if request.token_ids is not None:
        ids = list(request.token_ids)
    elif request.request is not None:
        prepared = prompts.prepare(request.request)
        if isinstance(prepared, Rejected):
            raise ValueError(prepared.message)
        ids = prepared.token_ids + list(prompts.tokenizer.encode(request.completion, add_special_tokens=False))
    else:
        ids = []
    if not ids:
        raise ValueError("nothing to trace")
    return tuple(ids[: request.max_tokens])


async def trace_stages(
    actors: Sequence[Any],
    specs: Sequence[StageSpec],
    node_ids: Sequence[str],
    wallets: Sequence[str | None],
    token_ids: Sequence[int],
    dims: int,
    timeout_s: float,
) -> tuple[tuple[StageTrace, ...], tuple[Any, ...]]:
    """Each stage's trace, and each stage's input (token ids for the first, hidden states after)."""
    current: Any = torch.tensor([list(token_ids)], dtype=torch.long)
    traces, inputs = [], []
    for actor, spec, node_id, wallet in zip(actors, specs, node_ids, wallets, strict=True):
        inputs.append(current)
        current, print_ = await asyncio.wait_for(actor.trace.remote(current, dims), timeout_s)
        traces.append(StageTrace(spec.index, spec.start, spec.end, node_id, wallet, tuple(print_)))
    return tuple(traces), tuple(inputs)


async def trace_replica(
    request: TraceRequest,
    replica_id: str,
    model: str,
    model_dir: str,
    dtype: str,
    prompts: PromptProcessor,
    actors: Sequence[Any],
    specs: Sequence[StageSpec],
    node_ids: Sequence[str],
    wallets: Sequence[str | None],
    timeout_s: float,
) -> TraceResult:
    """A replica's whole trace; a failure comes back as `error` (the verifier calls it inconclusive)."""
    try:
        token_ids = history_token_ids(request, prompts)
        stages, inputs = await trace_stages(
            actors, specs, node_ids, wallets, token_ids, request.fingerprint_dims, timeout_s
        )
    except Exception as exc:  # noqa: BLE001 - reported to the verifier, which decides
        return TraceResult(replica_id, model, model_dir, dtype, (), (), error=f"{type(exc).__name__}: {exc}")
    kept = inputs if request.keep_inputs else ()
    return TraceResult(replica_id, model, model_dir, dtype, token_ids, stages, kept)


def stage_nodes(pool: Any, label_prefix: str) -> tuple[list[str], list[str | None]]:
    """Each stage's Ray node id and that node's provider wallet label (None: no wallet, the operator's)."""
    if pool is None:
        return [], []
    import ray

    labels = {node["NodeID"]: node.get("Labels") or {} for node in ray.nodes()}
    node_ids = pool.node_ids()
    return node_ids, [labels.get(n, {}).get(f"{label_prefix}/wallet") for n in node_ids]


def inject_faults(pool: Any, fault: Any, timeout_s: float) -> int:
    """TEST / CHAOS TOOL: apply `pipeline.fault_injection` (a StageFaultSection) to the pool's stages;
    returns how many stages took it."""
    if pool is None or fault is None:
        return 0
    import ray

    calls = [
        actor.inject_fault.remote(fault.stage_index, fault.noise_scale, fault.seed, fault.node_label)
        for actor in pool.actors
    ]
    applied = sum(bool(x) for x in ray.get(calls, timeout=timeout_s))
    if applied:
        logger.warning("FAULT INJECTION: perturbed stage %d of this pipeline (test/chaos tool)", fault.stage_index)
    return applied
