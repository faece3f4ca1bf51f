"""Token selection on the last stage: greedy, temperature, top-k, top-p; seeded per sequence."""

import os

import torch

from serve_apps.engine.messages import SamplingParams


class Sampler:
    """Keeps one torch.Generator per sequence so a seeded request is reproducible under any batching."""

    def __init__(self) -> None:
        self._generators: dict[str, torch.Generator] = {}

    def release(self, seq_id: str) -> None:
        self._generators.pop(seq_id, None)

    def sample(self, logits: torch.Tensor, seq_ids: list[str], params: list[SamplingParams]) -> list[int]:
        """Pick one token per row of `logits` [B, V] (float32)."""
        tokens: list[int] = []
        greedy = logits.argmax(dim=-1).tolist()
        for row, (seq_id, param) in enumerate(zip(seq_ids, params, strict=True)):
            if param.greedy:
                tokens.append(int(greedy[row]))
            else:
                tokens.append(self._sample_row(logits[row], seq_id, param))
        return tokens

    def _sample_row(self, logits: torch.Tensor, seq_id: str, param: SamplingParams) -> int:
        probs = filtered_probs(logits, param.temperature, param.top_k, param.top_p)
        return int(torch.multinomial(probs, 1, generator=self._generator(seq_id, param.seed)))

    def _generator(self, seq_id: str, seed: int | None) -> torch.Generator:
        generator = self._generators.get(seq_id)
        if generator is None:
            generator = torch.Generator()
            generator.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
            self._generators[seq_id] = generator
        return generator


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
