"""Logprobs as the client sees them: the engine's token ids and raw logprobs turned into token texts and bytes.

A byte-level BPE token (GPT-2's alphabet: SmolLM2, Llama 3, Qwen) may hold part of a UTF-8 character, so its
bytes are read from the token itself (the alphabet maps each character back to one byte) rather than from its
decoded text, which shows such a fragment as U+FFFD. OpenAI sends logprobs as JSON numbers; a -inf (a logit
of -inf) is sent as -9999.0, the floor OpenAI itself reports.
"""

import math
from functools import cache

from transformers import PreTrainedTokenizerBase

from serve_apps.engine.messages import TokenLogprobs
from serve_apps.protocol import TokenScore

LOGPROB_FLOOR = -9999.0


@cache
def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-to-unicode table, inverted: the character each byte is written as in a byte-level vocab."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


class TokenScorer:
    """Turns TokenLogprobs of sampled tokens into TokenScores (texts cached per token id)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self._texts: dict[int, tuple[str, tuple[int, ...]]] = {}

    def score(self, token_id: int, logprobs: TokenLogprobs) -> TokenScore:
        text, raw = self.text(token_id)
        top = tuple(self._alternative(t, lp) for t, lp in logprobs.top)
        return TokenScore(text, _finite(logprobs.logprob), raw, top)

    def _alternative(self, token_id: int, logprob: float) -> TokenScore:
        text, raw = self.text(token_id)
        return TokenScore(text, _finite(logprob), raw)

    def text(self, token_id: int) -> tuple[str, tuple[int, ...]]:
        """The token's text and its bytes."""
        known = self._texts.get(token_id)
        if known is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            known = self._texts[token_id] = (text, self._bytes(token_id, text))
        return known

    def _bytes(self, token_id: int, text: str) -> tuple[int, ...]:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        alphabet = _byte_alphabet()
        if isinstance(piece, str) and piece and all(ch in alphabet for ch in piece):
            special = token_id in set(self.tokenizer.all_special_ids)
            if not special:
                return tuple(alphabet[ch] for ch in piece)
        return tuple(text.encode())


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else LOGPROB_FLOOR
