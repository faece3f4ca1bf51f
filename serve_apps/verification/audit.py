"""Verification of served traffic (pure: no Ray): what the coordinator keeps of a secretly sampled
fraction of sequences, and how an auditor re-executes and judges one provider stage's share of them.

The coordinator of a hub chain sees every remote stage's exact input and output rows (see
`serve_apps.server.hybrid`): `ServedAudit.observe` is its step observer. For an audited sequence it keeps,
per stage and position, the input row (token id on the first stage, hidden state after) and the stage's
top-k output activations (`commitments.token_topk`, 16 bytes per token until a job is built, then 8 as a
`Commitment`); for any other sequence it keeps nothing. Which sequences are audited is drawn with
`secrets` when a sequence is admitted and never leaves this object, so a provider cannot tell audited
traffic from the rest: every step it serves may be the one it is judged on.

When the sequence ends (`finish`), each remote stage's record becomes an `AuditJob`: that stage's inputs
in position order, its commitment, and which positions the stage computed with its low-bit weights
(steps of at most `low_bit_max_tokens` tokens use them, `serve_apps.engine.quant`). The auditor
(`serve_apps.verification.auditor`) rebuilds the stage from the operator's reference weights,
`reexecute`s it cache-free over the whole history (`serve_apps.verification.trace.trace_forward`, with
each projection's low-bit or dense weights per row as the stage used them) and `judge`s the commitment.

What is committed is the stage's own contribution, output minus input (the residual stream it was sent
carries on unchanged otherwise); the first stage commits its output. Calibration: see
tests/unit/verification/test_audit.py and the commitments module.
"""

import contextlib
import functools
import secrets
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn import functional as F

from serve_apps.engine.decoder import DecoderLayer
from serve_apps.engine.kv_cache import BatchView, Row
from serve_apps.engine.messages import SamplingParams, StepBatch, StepResult
from serve_apps.engine.sampling import adjust_logits, draw_seed, filtered_probs
from serve_apps.engine.stage_model import StageModel
from serve_apps.engine.stage_worker import StageConfig
from serve_apps.engine.token_mask import apply_token_masks
from serve_apps.verification.commitments import (
    CheckResult,
    Commitment,
    CommitmentError,
    Tolerance,
    check,
    commit_topk,
    token_topk,
    tolerance_for,
)
from serve_apps.verification.trace import projection, trace_forward


@dataclass(frozen=True, slots=True)
class AuditedStage:
    """Who serves one stage of the chain and what it was asked to run (the operator's StageConfig)."""

    provider_id: str
    wallet: str | None
    config: StageConfig
    model: str = ""  # the served model's public name (metrics)

    @property
    def key(self) -> tuple[str, str, int, int, bool, bool, str]:
        """What a reference copy of this stage is built from (the auditor caches models by it)."""
        c, s = self.config, self.config.spec
        return (c.model_dir, c.dtype, s.start, s.end, s.first, s.last, c.weight_quant)

    def uses_low_bit(self, step_tokens: int) -> bool:
        return self.config.weight_quant != "none" and step_tokens <= self.config.low_bit_max_tokens


@dataclass(frozen=True, slots=True)
class AuditLimits:
    """How much is audited and kept (settings: NetworkSection.verification_fraction and
    VerificationSection, see `from_network`)."""

    fraction: float = 0.02  # of sequences
    max_tokens: int = 512  # positions kept per sequence and stage; later ones are not audited
    max_sequences: int = 64  # audited sequences in flight; beyond, a sequence is not audited (counted)
    topk: int = 4
    chunk_tokens: int = 32
    tolerance: Tolerance | None = None  # None: calibrated by each stage's dtype (commitments.tolerance_for)

    def __post_init__(self) -> None:
        if not 0 <= self.fraction <= 1 or self.max_tokens < 1 or self.max_sequences < 0:
            raise ValueError("fraction must be in [0, 1], max_tokens >= 1 and max_sequences >= 0")

    @staticmethod
    def from_network(network: Any) -> "AuditLimits":
        """From a cluster.config.network.NetworkSection: `verification_fraction` and its `verification`."""
        section = network.verification
        return AuditLimits(
            fraction=network.verification_fraction,
            max_tokens=section.max_tokens,
            max_sequences=section.audit_max_sequences,
        )


@dataclass(frozen=True, slots=True)
class AuditJob:
    """One provider stage's share of one audited sequence: what the auditor re-executes and judges."""

    request_id: str
    seq_id: str
    stage: AuditedStage
    inputs: torch.Tensor  # token ids [T] long (first stage) or hidden states [T, H], position order
    low_bit: torch.Tensor  # [T] bool: the stage computed that position with its low-bit weights
    commitment: bytes  # Commitment.to_bytes() of the committed signal (see `committed_signal`); b"" last
    tolerance: Tolerance = field(default_factory=Tolerance)
    # The last stage answers tokens, not hidden states: (position of the new token, token id) it sampled,
    # and how (the sequence's SamplingParams); checked against the reference's logits (`check_tokens`).
    sampled: tuple[tuple[int, int], ...] = ()
    sampling: SamplingParams | None = None
    token_tolerance: "TokenTolerance" = field(default_factory=lambda: TokenTolerance())
    # The grammar's token mask each sampled token was drawn under (None: none), in `sampled`'s order; ()
    # when no chunk carried one. The reference applies them as the last stage did (token_mask.py).
    masks: tuple[bytes | None, ...] = ()

    @property
    def num_tokens(self) -> int:
        return int(self.inputs.shape[0])


@dataclass(frozen=True, slots=True)
class TokenTolerance:
    """When a last stage's sampled tokens still agree with the reference's logits."""

    greedy_margin: float = 1.0  # a greedy token's logit may be this far below the reference's largest
    seeded_margin: float = 1.0  # a seeded draw's race score (log p - log q, nats) this far below the best
    relaxed_top_p: float = 0.05  # the reference's nucleus is this much wider (a token at its edge)
    max_seeded_mismatch_fraction: float = 0.1  # if torch stops drawing as argmax(p / q): exact redraws
    min_prob: float = 1e-9  # unseeded: the token's reference probability (temperature only) at least


@dataclass(frozen=True, slots=True)
class AuditVerdict:
    """The outcome of one job; `worst_position` is where the stage disagrees most with the reference."""

    passed: bool
    request_id: str
    provider_id: str
    stage_index: int
    layer_start: int
    layer_end: int
    num_tokens: int
    reason: str
    worst_position: int | None = None
    stats: dict[str, float] = field(default_factory=dict)


@dataclass
class AuditStats:
    admitted: int = 0
    audited: int = 0
    skipped_full: int = 0  # would have been audited, but max_sequences were in flight
    positions_kept: int = 0
    positions_over_cap: int = 0
    jobs: int = 0
    incomplete: int = 0  # records with a gap from position 0 (nothing to re-execute from)


@dataclass
class _StageRecord:
    """One stage's observations of one audited sequence, by position."""

    stage: AuditedStage
    inputs: dict[int, torch.Tensor] = field(default_factory=dict)  # position -> input row (or token id)
    topk: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # -> (indices, bits)
    low_bit: dict[int, bool] = field(default_factory=dict)
    width: int = 0  # of the committed rows (the hidden size)
    sampled: dict[int, int] = field(default_factory=dict)  # last stage: new token's position -> token id
    masks: dict[int, bytes] = field(default_factory=dict)  # last stage: new token's position -> its grammar mask
    sampling: SamplingParams | None = None


@dataclass
class _Audited:
    request_id: str
    open: dict[int, _StageRecord] = field(default_factory=dict)  # stage index -> current record
    closed: list[_StageRecord] = field(default_factory=list)  # before a replay or a stage replacement


class ServedAudit:
    """The coordinator's side of served-traffic verification (one per chain; not thread-safe: call it
    from the engine's event loop)."""

    def __init__(self, limits: AuditLimits | None = None, draw: Any = None) -> None:
        self.limits = limits or AuditLimits()
        self._draw = draw or secrets.SystemRandom()  # unpredictable to anyone outside this process
        self._stages: dict[int, AuditedStage] = {}
        self._audited: dict[str, _Audited] = {}
        self.stats = AuditStats()

    # -- chain and sequence lifecycle ---------------------------------------------------------------
    def set_stage(self, index: int, stage: AuditedStage | None) -> None:
        """Stage `index` is now served by `stage` (None: by the operator, not audited). Records of the
        previous server are closed: its work is still audited when the sequences finish."""
        if self._stages.get(index) == stage:
            return
        if stage is None:
            self._stages.pop(index, None)
        else:
            self._stages[index] = stage
        for entry in self._audited.values():
            record = entry.open.pop(index, None)
            if record is not None:
                entry.closed.append(record)

    def admit(self, seq_id: str, request_id: str) -> bool:
        """Decide (secretly, once) whether the new sequence is audited."""
        self.stats.admitted += 1
        if seq_id in self._audited:
            return True
        if self._draw.random() >= self.limits.fraction:
            return False
        if len(self._audited) >= self.limits.max_sequences:
            self.stats.skipped_full += 1
            return False
        self._audited[seq_id] = _Audited(request_id)
        self.stats.audited += 1
        return True

    def is_audited(self, seq_id: str) -> bool:
        return seq_id in self._audited

    def audited_ids(self) -> list[str]:
        """The audited sequences in flight (the coordinator drops them all before a replay)."""
        return list(self._audited)

    def drop(self, seq_id: str) -> None:
        """The sequence is being replayed (its stages lost their caches): what each stage computed so far
        is closed (still audited at `finish`); the replay, from position 0, is recorded afresh."""
        entry = self._audited.get(seq_id)
        if entry is not None:
            entry.closed.extend(entry.open.values())
            entry.open.clear()

    def finish(self, seq_id: str) -> list["AuditJob"]:
        """The sequence ended: one job per remote stage record (nothing when it was not audited)."""
        entry = self._audited.pop(seq_id, None)
        if entry is None:
            return []
        jobs = [self._job(seq_id, entry.request_id, r) for r in (*entry.closed, *entry.open.values())]
        done = [job for job in jobs if job is not None]
        self.stats.jobs += len(done)
        return done

    def discard(self, seq_id: str) -> None:
        """Forget a sequence without auditing it (aborted before anything was served)."""
        self._audited.pop(seq_id, None)

    @property
    def in_flight(self) -> int:
        return len(self._audited)

    # -- the step observer ----------------------------------------------------------------------------
    def observe(self, stage_index: int, batch: StepBatch, inputs: torch.Tensor | None, outputs: Any) -> None:
        """A remote stage answered `batch`: keep what audited sequences need. `inputs`/`outputs` are the
        rows sent and received, in the stage's layout order (`BatchView.of(batch).order`, as StageWorker
        consumes and produces them); `inputs` is None on the first stage (its input is the batch's ids)."""
        stage = self._stages.get(stage_index)
        if stage is None or not self._audited:
            return
        if not any(c.seq_id in self._audited for c in batch.chunks):
            return
        view = BatchView.of([Row(c.slot, c.start_pos, len(c.token_ids)) for c in batch.chunks])
        low_bit = stage.uses_low_bit(batch.num_tokens)
        offset = 0
        for index in view.order:
            chunk = batch.chunks[index]
            rows = slice(offset, offset + len(chunk.token_ids))
            offset += len(chunk.token_ids)
            entry = self._audited.get(chunk.seq_id)
            if entry is None:
                continue
            record = entry.open.get(stage_index)
            if record is None:
                record = entry.open[stage_index] = _StageRecord(stage)
            chunk_inputs = torch.tensor(chunk.token_ids) if inputs is None else inputs[rows]
            if isinstance(outputs, StepResult):
                self._keep_sampled(record, chunk.start_pos, chunk_inputs, outputs.token_ids[index], low_bit)
                record.sampling = chunk.sampling
                if chunk.token_mask is not None and outputs.token_ids[index] >= 0:
                    record.masks[chunk.start_pos + len(chunk.token_ids)] = chunk.token_mask
            else:
                self._keep(record, chunk.start_pos, chunk_inputs, outputs[rows], low_bit)

    def _keep(self, record: _StageRecord, start: int, inputs: torch.Tensor, outputs: torch.Tensor, low: bool) -> None:
        keep = max(0, min(outputs.shape[0], self.limits.max_tokens - start))
        self.stats.positions_over_cap += outputs.shape[0] - keep
        if keep == 0:
            return
        signal = committed_signal(inputs[:keep], outputs[:keep], record.stage.config.spec.first)
        indices, bits = token_topk(signal, self.limits.topk)
        record.width = int(signal.shape[1])
        for j in range(keep):
            position = start + j
            if position not in record.inputs:
                self.stats.positions_kept += 1
            record.inputs[position] = inputs[j].detach().clone()
            record.topk[position] = (indices[j], bits[j])
            record.low_bit[position] = low

    def _keep_sampled(self, record: _StageRecord, start: int, inputs: torch.Tensor, token: int, low: bool) -> None:
        keep = max(0, min(inputs.shape[0], self.limits.max_tokens - start))
        self.stats.positions_over_cap += inputs.shape[0] - keep
        for j in range(keep):
            if start + j not in record.inputs:
                self.stats.positions_kept += 1
            record.inputs[start + j] = inputs[j].detach().clone()
            record.low_bit[start + j] = low
        end = start + inputs.shape[0]  # the sampled token's position; sampled from row end - 1
        if token >= 0 and keep == inputs.shape[0]:
            record.sampled[end] = token

    def _job(self, seq_id: str, request_id: str, record: _StageRecord) -> "AuditJob | None":
        length = 0
        while length in record.inputs:
            length += 1
        if length == 0:
            self.stats.incomplete += bool(record.inputs)
            return None
        if length < len(record.inputs):
            self.stats.incomplete += 1  # positions after a gap cannot be re-executed: audit the prefix
        positions = range(length)
        sampled: tuple[tuple[int, int], ...] = ()
        masks: tuple[bytes | None, ...] = ()
        if record.stage.config.spec.last:
            sampled = tuple(sorted((p, t) for p, t in record.sampled.items() if p <= length))
            if record.masks:
                masks = tuple(record.masks.get(p) for p, _ in sampled)
            commitment = b""
        else:
            indices = torch.stack([record.topk[p][0] for p in positions])
            bits = torch.stack([record.topk[p][1] for p in positions])
            commitment = commit_topk(indices, bits, record.width, self.limits.chunk_tokens).to_bytes()
        return AuditJob(
            request_id,
            seq_id,
            record.stage,
            torch.stack([record.inputs[p] for p in positions]),
            torch.tensor([record.low_bit[p] for p in positions], dtype=torch.bool),
            commitment,
            self.limits.tolerance or tolerance_for(record.stage.config.dtype),
            sampled,
            record.sampling,
            masks=masks,
        )


ROTATE = True


def committed_signal(inputs: torch.Tensor, outputs: torch.Tensor, first: bool) -> torch.Tensor:
    """What a stage's commitment covers: its own contribution `outputs - inputs` on hidden-state stages
    (the residual it was sent passes through unchanged otherwise), the outputs on the first stage;
    rotated by a fixed random matrix (`trace.projection`, seeded) so that every committed coordinate
    mixes all channels: unrotated, the top-k of a Llama's residual stream are its few outlier channels,
    blind to an error everywhere else."""
    signal = outputs.float() if first else outputs.float() - inputs.float()
    if not ROTATE:
        return signal
    return signal @ _rotation(signal.shape[-1])


@functools.lru_cache(maxsize=4)
def _rotation(hidden: int) -> torch.Tensor:
    return projection(hidden, hidden)


# -- the auditor's side -----------------------------------------------------------------------------------
def reexecute(model: StageModel, job: AuditJob) -> torch.Tensor:
    """The reference stage's cache-free forward over the job's whole history: [T, H] output rows (the
    last stage: float32 logits [S, V] of the rows its sampled tokens were drawn from). Each position
    uses the low-bit or the dense weights as the served stage did (`job.low_bit`), when the model holds
    low-bit copies (`StageModel.quantize` with the stage's weight_quant)."""
    batch = job.inputs.unsqueeze(0)
    with _row_selected_low_bit(model, job.low_bit):
        hidden = trace_forward(model, batch)[0]
    if not job.stage.config.spec.last:
        return hidden
    rows = torch.tensor([position - 1 for position, _ in job.sampled], dtype=torch.long)
    # A served step samples a few rows at once: the lm_head's low-bit copy, as `logits` picks it per call.
    step = max(1, model.low_bit_max_rows)
    return torch.cat(
        [model.logits(hidden[rows[i : i + step]]) for i in range(0, rows.numel(), step)] or [_empty(model)]
    )


def _empty(model: StageModel) -> torch.Tensor:
    vocab = model.lm_head.shape[0] if model.lm_head is not None else 0
    return torch.empty(0, vocab)


def judge(job: AuditJob, reference_outputs: torch.Tensor) -> AuditVerdict:
    """Compare the reference re-execution with the job's commitment."""
    spec = job.stage.config.spec
    if spec.last:
        result = check_tokens(job, reference_outputs)
    else:
        try:
            commitment = Commitment.from_bytes(job.commitment)
        except CommitmentError as exc:
            result = CheckResult(False, f"malformed commitment: {exc}", None)
        else:
            signal = committed_signal(job.inputs, reference_outputs, spec.first)
            result = check(commitment, signal, job.tolerance)
    return AuditVerdict(
        result.passed,
        job.request_id,
        job.stage.provider_id,
        spec.index,
        spec.start,
        spec.end,
        job.num_tokens,
        result.reason,
        result.worst_position,
        result.stats,
    )


def check_tokens(job: AuditJob, logits: torch.Tensor) -> CheckResult:
    """The last stage's sampled tokens against the reference logits [S, V] of the rows they came from.

    Greedy: each token's logit within `greedy_margin` of the largest. Seeded (`SamplingParams.seed`):
    the reference redraws each token as `Sampler` does (generator seeded by the seed and the position)
    and may disagree on at most `max_seeded_mismatch_fraction` of them (a draw near a boundary of the
    cumulative distribution flips with float noise). Unseeded: the draws are the stage's own secret,
    so only that each token has a reference probability of at least `min_prob`."""
    tol, params = job.token_tolerance, job.sampling or SamplingParams(temperature=0.0)
    if logits.shape[0] != len(job.sampled):
        return CheckResult(False, f"{logits.shape[0]} reference rows for {len(job.sampled)} tokens", None)
    if not job.sampled:
        return CheckResult(True, "no sampled tokens", None, stats={"tokens": 0.0})
    tokens = torch.tensor([t for _, t in job.sampled], dtype=torch.long)
    if bool((tokens >= logits.shape[1]).any()):
        return CheckResult(False, "a sampled token is outside the vocabulary", None)
    if any(mask is not None for mask in job.masks):
        logits = apply_token_masks(logits.clone(), list(job.masks))  # as the last stage sampled under them
    if params.adjusts_logits:
        logits = _adjusted(logits, job.sampled, params)
    chosen = logits.gather(1, tokens.view(-1, 1)).squeeze(1)
    gap = logits.max(dim=1).values - chosen
    stats = {"tokens": float(tokens.numel()), "max_logit_gap": float(gap.max())}
    worst = int(job.sampled[int(gap.argmax())][0])
    if params.greedy:
        wrong = gap > tol.greedy_margin
        failed = tuple(int(job.sampled[i][0]) for i in torch.nonzero(wrong).flatten())
        reason = f"{len(failed)} greedy tokens more than {tol.greedy_margin} logits below the best" if failed else ""
        return CheckResult(not failed, reason or "agrees", worst, failed, stats)
    if params.seed is not None:
        return _check_seeded(job, logits, params, stats, worst)
    probs = torch.softmax(logits / params.temperature, dim=1).gather(1, tokens.view(-1, 1)).squeeze(1)
    stats["min_prob"] = float(probs.min())
    unlikely = tuple(int(job.sampled[i][0]) for i in torch.nonzero(probs < tol.min_prob).flatten())
    reason = f"{len(unlikely)} tokens below probability {tol.min_prob}" if unlikely else "agrees"
    return CheckResult(not unlikely, reason, unlikely[0] if unlikely else worst, unlikely, stats)


def _adjusted(logits: torch.Tensor, sampled: tuple[tuple[int, int], ...], params: SamplingParams) -> torch.Tensor:
    """The reference logits after the request's penalties and bias, as `Sampler` adjusted them: the
    tokens generated before each row are the sampled tokens at earlier positions."""
    rows, generated = [], Counter[int]()
    for row, (_, token) in enumerate(sampled):
        rows.append(adjust_logits(logits[row], params, generated))
        generated[token] += 1
    return torch.stack(rows)


def _check_seeded(
    job: AuditJob, logits: torch.Tensor, params: SamplingParams, stats: dict[str, float], worst: int
) -> CheckResult:
    """torch.multinomial draws one sample as argmax(p / q), q ~ Exp(1) from the generator (checked here
    on every row): so the served token must nearly win the race under the reference's p with the very q
    the stage drew. Float noise moves scores a little; another token loses by whole nats."""
    tol = job.token_tolerance
    generator = torch.Generator()
    gaps, exact_differ, race = [], [], True
    relaxed_top_p = min(1.0, params.top_p + tol.relaxed_top_p) if params.top_p < 1.0 else 1.0
    for row, (position, token) in enumerate(job.sampled):
        probs = filtered_probs(logits[row], params.temperature, params.top_k, params.top_p)
        generator.manual_seed(draw_seed(params.seed or 0, position))
        redrawn = int(torch.multinomial(probs, 1, generator=generator))
        generator.manual_seed(draw_seed(params.seed or 0, position))
        # Scores on the unnormalized scale (one constant apart from log p - log q within any filter).
        score = (
            logits[row].float() / params.temperature - torch.empty_like(probs).exponential_(generator=generator).log()
        )
        best = score.masked_fill(probs == 0, float("-inf"))
        race = race and int(best.argmax()) == redrawn
        allowed = filtered_probs(logits[row], params.temperature, params.top_k, relaxed_top_p)[token] > 0
        gaps.append(float(best.max() - score[token]) if allowed else float("inf"))
        if redrawn != token:
            exact_differ.append(position)
    stats["seeded_mismatch_fraction"] = len(exact_differ) / len(job.sampled)
    stats["max_race_gap"] = max(gaps)
    if race:
        failed = tuple(int(job.sampled[i][0]) for i, gap in enumerate(gaps) if gap > tol.seeded_margin)
        reason = f"{len(failed)} seeded draws lose the race by more than {tol.seeded_margin} nats" if failed else ""
        return CheckResult(not failed, reason or "agrees", failed[0] if failed else worst, failed, stats)
    passed = stats["seeded_mismatch_fraction"] <= tol.max_seeded_mismatch_fraction
    reason = "agrees" if passed else f"{len(exact_differ)} of {len(job.sampled)} seeded draws differ"
    return CheckResult(passed, reason, exact_differ[0] if exact_differ else worst, tuple(exact_differ), stats)


class _RowSelect:
    """Stands in for a layer's LowBitWeight: rows flagged in `mask` through the packed copy, the others
    through the dense matrix (what each served step chose by its size)."""

    def __init__(self, dense: torch.Tensor, low: Any, mask: torch.Tensor) -> None:
        self.dense, self.low, self.mask = dense, low, mask

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.dense)
        if bool(self.mask.any()):
            out[self.mask] = self.low.matmul(x[self.mask])
        return out


@contextlib.contextmanager
def _row_selected_low_bit(model: StageModel, mask: torch.Tensor) -> Iterator[None]:
    layers = [layer for layer in model.layers if isinstance(layer, DecoderLayer) and layer.low_bit]
    saved = [(layer.low_bit, layer.low_bit_max_rows) for layer in layers]
    try:
        for layer in layers:
            layer.low_bit = {n: _RowSelect(getattr(layer, n), low, mask) for n, low in layer.low_bit.items()}  # type: ignore[misc]
            layer.low_bit_max_rows = mask.numel()
        yield
    finally:
        for layer, (low_bit, max_rows) in zip(layers, saved, strict=True):
            layer.low_bit, layer.low_bit_max_rows = low_bit, max_rows
