"""A small served chain for audit tests: real StageWorkers stepped with KV caches through mixed batches
(decodes of several sequences beside one prefill chunk), the audit observing every hidden-state stage as
a hub coordinator would, an optional `tamper` standing in for a cheating provider, and `perturb_weights`
for a provider that serves with wrong weights."""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from serve_apps.engine.messages import SamplingParams, SeqChunk, StepBatch, StepResult
from serve_apps.engine.stage_model import StageModel
from serve_apps.engine.stage_worker import StageWorker
from serve_apps.verification.audit import AuditJob, ServedAudit

GREEDY = SamplingParams(temperature=0.0, max_tokens=4096)
# (stage index, batch, inputs sent (None on stage 0), honest outputs) -> what the provider answers
Tamper = Callable[[int, StepBatch, torch.Tensor | None, Any], Any]


@torch.inference_mode()
def perturb_weights(target: StageWorker | StageModel, noise_scale: float, seed: int) -> None:
    """Add seeded Gaussian noise (noise_scale x each weight's std) to a stage's decoder-layer weights."""
    model = target.model if isinstance(target, StageWorker) else target
    generator = torch.Generator().manual_seed(seed)
    for param in model.layers.parameters():
        noise = torch.randn(param.shape, generator=generator, dtype=torch.float32).to(param.dtype)
        param.add_(noise * param.float().std().to(param.dtype) * noise_scale)


@dataclass
class Served:
    histories: dict[str, list[int]]
    jobs: list[AuditJob] = field(default_factory=list)
    steps: int = 0


def serve(
    pipeline: list[StageWorker],
    prompts: dict[str, list[int]],
    decode_tokens: int,
    audit: ServedAudit | None = None,
    tamper: Tamper | None = None,
    prefill_chunk: int = 16,
    request_prefix: str = "req",
    sampling: SamplingParams = GREEDY,
    token_mask: bytes | None = None,
) -> Served:
    """Serve every prompt to `decode_tokens` new tokens; slots are the prompts' order."""
    slots = {seq_id: i for i, seq_id in enumerate(prompts)}
    histories = {seq_id: list(p) for seq_id, p in prompts.items()}
    cached = dict.fromkeys(prompts, 0)
    pending, decoding = list(prompts), list[str]()
    released: list[tuple[str, int]] = []
    served = Served(histories)
    if audit is not None:
        for seq_id in prompts:
            audit.admit(seq_id, f"{request_prefix}-{seq_id}")
    while pending or decoding:
        chunks = [
            SeqChunk(s, slots[s], len(histories[s]) - 1, (histories[s][-1],), sampling, True, token_mask)
            for s in decoding
        ]
        if pending:
            s = pending[0]
            n = min(prefill_chunk, len(histories[s]) - cached[s])
            done = cached[s] + n == len(histories[s])
            chunks.append(
                SeqChunk(
                    s,
                    slots[s],
                    cached[s],
                    tuple(histories[s][cached[s] : cached[s] + n]),
                    sampling,
                    done,
                    token_mask if done else None,
                )
            )
        batch = StepBatch(served.steps, tuple(chunks), tuple(released))
        released = []
        result = step(pipeline, batch, audit, tamper)
        served.steps += 1
        for chunk, token in zip(chunks, result.token_ids, strict=True):
            if chunk.sample:
                histories[chunk.seq_id].append(token)
        if pending:
            cached[pending[0]] += len(chunks[-1].token_ids)
            if chunks[-1].sample:
                decoding.append(pending.pop(0))
        for s in list(decoding):
            if len(histories[s]) - len(prompts[s]) >= decode_tokens:
                decoding.remove(s)
                released.append((s, slots[s]))
                if audit is not None:
                    served.jobs.extend(audit.finish(s))
    return served


def step(
    pipeline: list[StageWorker], batch: StepBatch, audit: ServedAudit | None = None, tamper: Tamper | None = None
) -> StepResult:
    """One step through the chain, the audit observing every stage that answers hidden states."""
    hidden: torch.Tensor | None = None
    for index, worker in enumerate(pipeline):
        out = worker.forward(batch, hidden)
        if tamper is not None:
            out = tamper(index, batch, hidden, out)
        if audit is not None:
            audit.observe(index, batch, hidden, out)
        if isinstance(out, StepResult):
            return out
        hidden = out
    raise RuntimeError("the last stage returned hidden states")
