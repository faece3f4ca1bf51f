"""Iteration-level scheduler: decides which sequences run in the next step; computes nothing.

Sequences wait in a bounded FIFO queue, get a KV slot when one is free, are prefilled and then decode
together. A step carries a batch of single-token decodes and, beside them, prompt chunks of the sequences
waiting for their prefill (several sequences' chunks, at most `prefill_chunk` prompt tokens in all), so
new requests reach their first token without stalling the running ones, and a burst of prompts (or a
replay after a stage was lost) shares steps. Every sequence keeps its whole token history, so its cache
can be rebuilt by replaying it.

Pipelining: with `num_microbatches` = M > 1 the engine keeps up to M steps in flight, one per stage in the
best case. A sequence is in at most one step at a time, so the decoding sequences are split into M
micro-batches of near-equal size; while micro-batch k is on stage 1, micro-batch k+1 runs on stage 0.
"""

import itertools
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from serve_apps.engine.messages import SamplingParams, SeqChunk, StepBatch, StepResult, TokenLogprobs


class QueueFullError(Exception):
    """The waiting queue is at its bound; the caller should answer 503 with Retry-After."""


class OutputConstraint(Protocol):
    """A grammar a sequence's output must follow (serve_apps.engine.grammar.TokenConstraint)."""

    def next_mask(self) -> bytes: ...

    def accept(self, token: int) -> bool: ...

    @property
    def terminated(self) -> bool: ...


class SeqStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    """One generation: its prompt, its outputs so far and how much of it the stages have cached."""

    seq_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    max_len: int
    output_ids: list[int] = field(default_factory=list)
    slot: int | None = None
    num_cached: int = 0
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: str | None = None
    constraint: OutputConstraint | None = None  # a grammar: each sampled token's chunk carries its mask
    next_mask: bytes | None = field(default=None, init=False)  # the mask of the next token to sample

    def __post_init__(self) -> None:
        if self.constraint is not None:
            self.next_mask = self.constraint.next_mask()

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def prefill_target(self) -> int:
        """Tokens to cache before decoding: the prompt, or after a replay the whole history but its last token."""
        return len(self.token_ids) - 1 if self.output_ids else len(self.prompt_ids)

    @property
    def prefilled(self) -> bool:
        return self.num_cached >= self.prefill_target


@dataclass(frozen=True, slots=True)
class TokenUpdate:
    """A token the step produced for a sequence, and whether the sequence is finished by it."""

    seq_id: str
    token_id: int
    finish_reason: str | None
    logprobs: TokenLogprobs | None = None
    embedding: tuple[float, ...] | None = None  # an embedding sequence's result (token_id -1)


@dataclass(frozen=True, slots=True)
class SchedulerLimits:
    num_slots: int
    max_batch_size: int
    max_queue: int
    prefill_chunk: int = 512
    num_microbatches: int = 1  # steps the engine keeps in flight (pipelining); decodes are split this many ways

    def __post_init__(self) -> None:
        smallest = min(self.num_slots, self.max_batch_size, self.prefill_chunk, self.num_microbatches)
        if smallest < 1 or self.max_queue < 0:
            raise ValueError(f"invalid scheduler limits: {self}")


class Scheduler:
    """Owns every sequence's state and the slot table; the engine asks it for steps and feeds back results."""

    def __init__(self, limits: SchedulerLimits, eos_token_ids: tuple[int, ...]) -> None:
        self.limits = limits
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: dict[str, Sequence] = {}
        self._free_slots = list(range(limits.num_slots - 1, -1, -1))
        self._released: list[tuple[str, int]] = []
        self._step_ids = itertools.count()
        self._inflight: dict[int, list[Sequence]] = {}
        self._inflight_released: dict[int, tuple[tuple[str, int], ...]] = {}

    # -- requests -------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        """Queue a sequence; QueueFullError when `max_queue` are already waiting."""
        if len(self.waiting) >= self.limits.max_queue + len(self._free_slots):
            raise QueueFullError(f"{len(self.waiting)} requests are waiting")
        self.waiting.append(seq)

    def finish(self, seq_id: str, reason: str) -> Sequence | None:
        """End a sequence early (stop string, client gone, timeout) and free its slot."""
        for seq in list(self.waiting):
            if seq.seq_id == seq_id:
                self.waiting.remove(seq)
                return self._mark_finished(seq, reason)
        running = self.running.get(seq_id)
        return self._mark_finished(running, reason) if running is not None else None

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # -- steps ----------------------------------------------------------------------------------
    def schedule(self) -> StepBatch | None:
        """The next step, or None when nothing can run (no work, or every running row is in flight)."""
        self._admit()
        busy = {s.seq_id for seqs in self._inflight.values() for s in seqs}
        prefill = [s for s in self.running.values() if not s.prefilled and s.seq_id not in busy]
        decoding = [s for s in self.running.values() if s.prefilled]
        decode = [s for s in decoding if s.seq_id not in busy][: self._microbatch_size(len(decoding))]
        if not (decode or prefill or self._released):
            return None
        chunks = [self._decode_chunk(seq) for seq in decode]
        prefilled = self._prefill_chunks(prefill)
        chunks += [chunk for _, chunk in prefilled]
        # Rotate so that, past max_batch_size, every decoding sequence gets its turn.
        for seq in decode:
            self.running[seq.seq_id] = self.running.pop(seq.seq_id)
        seqs = decode + [seq for seq, _ in prefilled]
        return self._emit(StepBatch(next(self._step_ids), tuple(chunks), self._take_released()), seqs)

    def update(self, result: StepResult) -> list[TokenUpdate]:
        """Apply a finished step: append sampled tokens, detect EOS and length limits."""
        seqs = self._inflight.pop(result.step_id, [])
        self._inflight_released.pop(result.step_id, None)
        updates: list[TokenUpdate] = []
        scores = result.logprobs or (None,) * len(seqs)
        pooled = result.pooled or (None,) * len(seqs)
        for seq, token, score, embedding in zip(seqs, result.token_ids, scores, pooled, strict=True):
            if seq.status is SeqStatus.FINISHED:
                continue
            if embedding is not None and seq.sampling.embed:  # its one result: the sequence is done
                self._mark_finished(seq, "stop")
                updates.append(TokenUpdate(seq.seq_id, -1, "stop", embedding=embedding))
                continue
            if token < 0:
                continue
            seq.output_ids.append(token)
            reason = self._constrained(seq, token) or self._finish_reason(seq, token)
            if reason is not None:
                self._mark_finished(seq, reason)
            updates.append(TokenUpdate(seq.seq_id, token, reason, score))
        return updates

    def replay_all(self) -> int:
        """After stages lost their KV caches: re-prefill every resident sequence from its token history.

        Already sampled tokens are kept and not sampled again, so generation resumes where it stopped.
        Returns the number of sequences that will be replayed.
        """
        for step_id in list(self._inflight):
            self._requeue_released(step_id)
        self._inflight.clear()
        for seq in self.running.values():
            seq.num_cached = 0
        return len(self.running)

    # -- internals ------------------------------------------------------------------------------
    def _admit(self) -> None:
        while self.waiting and self._free_slots:
            seq = self.waiting.popleft()
            seq.slot = self._free_slots.pop()
            seq.status = SeqStatus.RUNNING
            self.running[seq.seq_id] = seq

    def _prefill_chunks(self, waiting: list[Sequence]) -> list[tuple[Sequence, SeqChunk]]:
        """The next prompt chunk of each sequence in `waiting`, first come first, within the token budget."""
        budget, chunks = self.limits.prefill_chunk, []
        for seq in waiting:
            if budget <= 0:
                break
            start, target = seq.num_cached, seq.prefill_target
            end = min(target, start + budget)
            tokens = tuple(seq.token_ids[start:end])
            sample = end == target and not seq.output_ids
            mask = seq.next_mask if sample else None
            chunk = SeqChunk(seq.seq_id, _slot(seq), start, tokens, seq.sampling, sample, mask, len(seq.prompt_ids))
            chunks.append((seq, chunk))
            seq.num_cached, budget = end, budget - len(tokens)
        return chunks

    def _decode_chunk(self, seq: Sequence) -> SeqChunk:
        position = len(seq.token_ids) - 1
        seq.num_cached = position + 1
        return SeqChunk(
            seq.seq_id,
            _slot(seq),
            position,
            (seq.token_ids[-1],),
            seq.sampling,
            True,
            seq.next_mask,
            len(seq.prompt_ids),
        )

    def _microbatch_size(self, decoding: int) -> int:
        """Rows of one decode step: the decoding sequences split evenly over the micro-batches."""
        return max(1, min(self.limits.max_batch_size, -(-decoding // self.limits.num_microbatches)))

    def _emit(self, batch: StepBatch, seqs: list[Sequence]) -> StepBatch:
        self._inflight[batch.step_id] = seqs
        if batch.released_slots:
            self._inflight_released[batch.step_id] = batch.released_slots
        return batch

    def _requeue_released(self, step_id: int) -> None:
        # A step that never completed may not have told every stage which sequences ended: tell them again.
        self._released.extend(self._inflight_released.pop(step_id, ()))

    def _take_released(self) -> tuple[tuple[str, int], ...]:
        released, self._released = tuple(self._released), []
        return released

    def _constrained(self, seq: Sequence, token: int) -> str | None:
        """Advance the sequence's grammar by `token` and compute the next token's mask (here, on the
        coordinator, while the stages compute the other micro-batches). "stop" once the grammar is complete,
        "error" when the token broke it (the last stage did not apply the mask)."""
        if seq.constraint is None:
            return None
        if not seq.constraint.accept(token):
            return "error"
        if seq.constraint.terminated:
            return "stop"
        if len(seq.output_ids) < seq.sampling.max_tokens and len(seq.token_ids) < seq.max_len:
            seq.next_mask = seq.constraint.next_mask()
        return None

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        params = seq.sampling
        if (token in self.eos_token_ids and not params.ignore_eos) or token in params.stop_token_ids:
            return "stop"
        if len(seq.output_ids) >= params.max_tokens or len(seq.token_ids) >= seq.max_len:
            return "length"
        return None

    def _mark_finished(self, seq: Sequence, reason: str) -> Sequence:
        if seq.status is SeqStatus.FINISHED:
            return seq
        if seq.slot is not None:
            self._released.append((seq.seq_id, seq.slot))
            self._free_slots.append(seq.slot)
        self.running.pop(seq.seq_id, None)
        seq.status, seq.finish_reason = SeqStatus.FINISHED, reason
        return seq


def _slot(seq: Sequence) -> int:
    if seq.slot is None:
        raise RuntimeError(f"sequence {seq.seq_id} has no KV slot")
    return seq.slot
