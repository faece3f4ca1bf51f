"""Incremental detokenisation with stop strings, per request.

Text is emitted only once it can no longer change: a trailing partial UTF-8 character (decoded as
U+FFFD) or a possible prefix of a stop string is held back until the next token settles it.
"""

from dataclasses import dataclass, field
from typing import Protocol


class TokenDecoder(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


@dataclass
class Detokenizer:
    """Turns a growing list of token ids into text deltas; detects stop strings."""

    tokenizer: TokenDecoder
    stop: tuple[str, ...] = ()
    token_ids: list[int] = field(default_factory=list)
    emitted: str = ""
    stopped: bool = False

    def add(self, token_id: int, final: bool = False) -> str:
        """Append a token; return the text that is now certain (all remaining text if `final`)."""
        if self.stopped:
            return ""
        self.token_ids.append(token_id)
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        cut = self._stop_index(text)
        if cut is not None:
            self.stopped = True
            return self._emit(text[:cut])
        if final:
            return self._emit(text)
        return self._emit(text[: self._safe_end(text)])

    def flush(self) -> str:
        """Whatever is still held back (used when generation ends without a new token)."""
        if self.stopped:
            return ""
        return self._emit(self.tokenizer.decode(self.token_ids, skip_special_tokens=True))

    def _stop_index(self, text: str) -> int | None:
        hits = [i for i in (text.find(stop, max(0, len(self.emitted) - len(stop))) for stop in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _safe_end(self, text: str) -> int:
        end = len(text)
        while end > len(self.emitted) and text[end - 1] == "\ufffd":
            end -= 1
        for stop in self.stop:
            for k in range(min(len(stop) - 1, end), 0, -1):
                if text[:end].endswith(stop[:k]):
                    end = min(end, len(text[:end]) - k)
                    break
        return max(end, len(self.emitted))

    def _emit(self, text: str) -> str:
        if not text.startswith(self.emitted):
            # The tokenizer revised earlier text (rare merges); emit only what extends what we sent.
            common = 0
            while common < min(len(text), len(self.emitted)) and text[common] == self.emitted[common]:
                common += 1
            text = self.emitted + text[common:] if common == len(self.emitted) else self.emitted
        delta = text[len(self.emitted) :]
        self.emitted = text
        return delta
