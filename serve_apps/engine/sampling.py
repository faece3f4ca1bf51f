"""Token selection on the last stage: greedy, temperature, top-k, top-p; seeded per sequence; presence and
frequency penalties, logit bias and logprobs.

The logit adjustments follow OpenAI's definition (as vLLM implements it): with c[t] the times token t was
generated so far in this sequence, `logit[t] - c[t] * frequency_penalty - (c[t] > 0) * presence_penalty
+ logit_bias[t]`, applied before temperature and filtering (and before greedy argmax). Logprobs are the
model's own (log-softmax of the raw logits, before any of that), as vLLM's default reports them.
"""

import hashlib
import os
from collections import Counter
from collections.abc import Sequence

import torch

from serve_apps.engine.messages import SamplingParams, SeqChunk, TokenLogprobs


class Sampler:
    """Draws each token from a generator seeded by (the request's seed, the token's position).

    So a seeded request is reproducible under any batching, and after a restart of the last stage (its
    state is lost, the sequence is replayed) it continues with the very draws it would have made.
    Unseeded requests get a random base seed per sequence.
    """

    def __init__(self) -> None:
        self._base_seeds: dict[str, int] = {}
        self._generator = torch.Generator()
        self._generated: dict[str, Counter[int]] = {}  # penalized sequences: their generated tokens

    def release(self, seq_id: str) -> None:
        self._base_seeds.pop(seq_id, None)
        self._generated.pop(seq_id, None)

    def observe(self, chunks: Sequence[SeqChunk]) -> None:
        """Count the generated tokens a step's chunks feed in (positions from `output_start` on), for the
        penalties. Every generated token enters the pipeline exactly once after it was sampled, and a
        chunk from position 0 (a new sequence, or a replay after a stage was lost) starts the count
        over, so the counts are rebuilt from the inputs alone, also by a restarted last stage."""
        for chunk in chunks:
            if not chunk.sampling.penalized:
                continue
            if chunk.start_pos == 0:
                self._generated.pop(chunk.seq_id, None)
            counts = self._generated.setdefault(chunk.seq_id, Counter())
            skip = max(0, chunk.output_start - chunk.start_pos)
            counts.update(chunk.token_ids[skip:])

    def step(
        self, logits: torch.Tensor, chunks: Sequence[SeqChunk], raw: torch.Tensor | None = None
    ) -> tuple[list[int], list[TokenLogprobs | None]]:
        """Tokens (and logprobs where asked) for the sampling chunks of a step, one row of `logits` each;
        call `observe` with the step's chunks first. `raw`: the logits before a grammar's mask (what the
        logprobs report; default `logits`)."""
        params = [c.sampling for c in chunks]
        seq_ids = [c.seq_id for c in chunks]
        raw = logits if raw is None else raw
        if any(p.adjusts_logits for p in params):
            logits = logits.clone()
            for row, (seq_id, param) in enumerate(zip(seq_ids, params, strict=True)):
                if param.adjusts_logits:
                    logits[row] = adjust_logits(logits[row], param, self._generated.get(seq_id))
        positions = [c.start_pos + len(c.token_ids) for c in chunks]
        tokens = self.sample(logits, seq_ids, params, positions)
        return tokens, token_logprobs(raw, tokens, params)

    def sample(
        self,
        logits: torch.Tensor,
        seq_ids: list[str],
        params: list[SamplingParams],
        positions: list[int] | None = None,
    ) -> list[int]:
        """Pick one token per row of `logits` [B, V] (float32); `positions[i]`: where row i's token goes."""
        tokens: list[int] = []
        greedy = logits.argmax(dim=-1).tolist()
        for row, (seq_id, param) in enumerate(zip(seq_ids, params, strict=True)):
            if param.greedy:
                tokens.append(int(greedy[row]))
            else:
                position = positions[row] if positions is not None else 0
                tokens.append(self._sample_row(logits[row], seq_id, param, position))
        return tokens

    def _sample_row(self, logits: torch.Tensor, seq_id: str, param: SamplingParams, position: int) -> int:
        # Filtered where the logits are; drawn on the host generator, so a seed draws the same token on any device.
        probs = filtered_probs(logits, param.temperature, param.top_k, param.top_p).cpu()
        base = param.seed if param.seed is not None else self._base_seed(seq_id)
        self._generator.manual_seed(draw_seed(base, position))
        return int(torch.multinomial(probs, 1, generator=self._generator))

    def _base_seed(self, seq_id: str) -> int:
        base = self._base_seeds.get(seq_id)
        if base is None:
            base = self._base_seeds[seq_id] = int.from_bytes(os.urandom(8), "little") >> 1
        return base


def adjust_logits(logits: torch.Tensor, params: SamplingParams, generated: Counter[int] | None) -> torch.Tensor:
    """One row [V] after the penalties (for the `generated` token counts) and the logit bias."""
    out = logits.float().clone()
    if generated and params.penalized:
        ids = torch.tensor(list(generated), dtype=torch.long, device=out.device)
        counts = torch.tensor([generated[t] for t in generated], dtype=out.dtype, device=out.device)
        ids, counts = ids[ids < out.numel()], counts[ids < out.numel()]
        out[ids] -= counts * params.frequency_penalty + params.presence_penalty
    if params.logit_bias:
        ids = torch.tensor([t for t, _ in params.logit_bias], dtype=torch.long, device=out.device)
        bias = torch.tensor([b for _, b in params.logit_bias], dtype=out.dtype, device=out.device)
        keep = ids < out.numel()
        out[ids[keep]] += bias[keep]
    return out


def token_logprobs(
    logits: torch.Tensor, tokens: list[int], params: Sequence[SamplingParams]
) -> list[TokenLogprobs | None]:
    """The raw logprobs of each row's token and its `params.logprobs` most likely alternatives."""
    wanted = [p.logprobs for p in params]
    if all(k is None for k in wanted):
        return [None] * len(tokens)
    rows = [i for i, k in enumerate(wanted) if k is not None]
    logprobs = torch.log_softmax(logits[rows].float(), dim=-1)
    most = max(wanted[i] or 0 for i in rows)
    top_values, top_ids = torch.topk(logprobs, most, dim=-1) if most else (None, None)
    out: list[TokenLogprobs | None] = [None] * len(tokens)
    for j, i in enumerate(rows):
        k = wanted[i] or 0
        top: tuple[tuple[int, float], ...] = ()
        if k and top_ids is not None and top_values is not None:
            top = tuple(zip(top_ids[j, :k].tolist(), top_values[j, :k].tolist(), strict=True))
        out[i] = TokenLogprobs(float(logprobs[j, tokens[i]]), top)
    return out


def draw_seed(seed: int, position: int) -> int:
    """A 63-bit generator seed for the draw at `position` of a request seeded with `seed`."""
    digest = hashlib.blake2b(f"{seed}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def filtered_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Probabilities after temperature scaling, top-k and nucleus (top-p) filtering of one row."""
    scaled = logits.float() / temperature
    if 0 < top_k < scaled.numel():
        kth = torch.topk(scaled, top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token once the mass before it already reaches top_p (the first token always stays).
        drop = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= top_p
        scaled = scaled.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.softmax(scaled, dim=-1)
