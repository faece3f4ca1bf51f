"""The replica side of a trace: the history's token ids, then each stage's cache-free forward in order."""

import asyncio
from collections.abc import Sequence
from typing import Any

import torch

from serve_apps.engine.layer_split import StageSpec
from serve_apps.protocol import Rejected
from serve_apps.server.tokenization import PromptProcessor
from serve_apps.verification.protocol import StageTrace, TraceRequest


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
