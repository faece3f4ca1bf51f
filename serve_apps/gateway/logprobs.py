"""Logprobs in OpenAI's two shapes, from the replica's TokenScores.

Chat: `choices[].logprobs.content` is a list of `{token, logprob, bytes, top_logprobs: [{token, logprob,
bytes}]}` (and `refusal: null`). Completions (the legacy shape): `tokens`, `token_logprobs`, `top_logprobs`
(per token a dict of the k most likely tokens' texts to their logprobs, always with the sampled token, so up
to k + 1 entries) and `text_offset` (where each token starts in the choice's text, counted in characters).
The logprobs are the model's raw ones (log-softmax of the logits, before temperature, penalties, logit_bias
and a grammar's mask), as vLLM reports them by default.
"""

from collections.abc import Sequence

from serve_apps.protocol import TokenScore


def chat_entries(scores: Sequence[TokenScore]) -> list[dict]:
    return [
        {
            "token": s.token,
            "logprob": s.logprob,
            "bytes": list(s.bytes),
            "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": list(t.bytes)} for t in s.top],
        }
        for s in scores
    ]


def chat_logprobs(scores: Sequence[TokenScore]) -> dict:
    return {"content": chat_entries(scores), "refusal": None}


class CompletionLogprobs:
    """The legacy shape for one choice, part by part (a stream's chunks), keeping each token's text offset."""

    def __init__(self) -> None:
        self.offset = 0

    def part(self, scores: Sequence[TokenScore]) -> dict:
        tokens, offsets = [], []
        for score in scores:
            tokens.append(score.token)
            offsets.append(self.offset)
            self.offset += len(score.token)
        tops = []
        for score in scores:
            top = {t.token: t.logprob for t in score.top}
            top.setdefault(score.token, score.logprob)
            tops.append(top)
        return {
            "tokens": tokens,
            "token_logprobs": [s.logprob for s in scores],
            "top_logprobs": tops,
            "text_offset": offsets,
        }


def merge_completion(parts: Sequence[dict]) -> dict:
    """One choice's whole legacy logprobs from its parts."""
    keys = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
    return {key: [item for part in parts for item in part[key]] for key in keys}
