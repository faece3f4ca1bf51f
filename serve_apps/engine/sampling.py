"""Token selection on the last stage: greedy, temperature, top-k, top-p; seeded per sequence."""

import hashlib
import os

import torch

from serve_apps.engine.messages import SamplingParams


class Sampler:
    """Draws each token from a generator seeded by (the request's seed, the token's position).

    So a seeded request is reproducible under any batching, and after a restart of the last stage (its
    state is lost, the sequence is replayed) it continues with the very draws it would have made.
    Unseeded requests get a random base seed per sequence.
    """

    def __init__(self) -> None:
        self._base_seeds: dict[str, int] = {}
        self._generator = torch.Generator()

    def release(self, seq_id: str) -> None:
        self._base_seeds.pop(seq_id, None)

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
        probs = filtered_probs(logits, param.temperature, param.top_k, param.top_p)
        base = param.seed if param.seed is not None else self._base_seed(seq_id)
        self._generator.manual_seed(draw_seed(base, position))
        return int(torch.multinomial(probs, 1, generator=self._generator))

    def _base_seed(self, seq_id: str) -> int:
        base = self._base_seeds.get(seq_id)
        if base is None:
            base = self._base_seeds[seq_id] = int.from_bytes(os.urandom(8), "little") >> 1
        return base


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
