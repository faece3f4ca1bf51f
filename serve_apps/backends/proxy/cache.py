"""Answers of identical deterministic requests (temperature 0, or a fixed seed), kept for a while.

An entry is keyed by everything that decides the answer: the upstream model, the prompt or messages
and the sampling parameters, and by the payer: a hit is answered at once, so a cache shared across payers
would tell anyone, by timing, whether someone else sent a given prompt (open mode has no payer: one scope).
Bounded (LRU) and expiring; per replica, in memory.
"""

import hashlib
import json
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass

from serve_apps.protocol import GenerateRequest


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


def cacheable(request: GenerateRequest) -> bool:
    """Only deterministic requests: greedy, or sampled with a seed."""
    return request.sampling.temperature == 0.0 or request.sampling.seed is not None


def cache_key(request: GenerateRequest, upstream_model: str) -> str:
    turns = [[turn.role, turn.content] for turn in request.messages] if request.messages is not None else None
    material = {
        "payer": request.payer,
        "model": upstream_model,
        "prompt": request.prompt,
        "messages": turns,
        "sampling": asdict(request.sampling),
        "max_tokens_given": request.max_tokens_given,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=list).encode()).hexdigest()


class ResponseCache:
    """LRU of `max_entries` answers, each valid for `ttl_s` seconds."""

    def __init__(self, max_entries: int, ttl_s: float) -> None:
        self.max_entries, self.ttl_s = max_entries, ttl_s
        self._entries: OrderedDict[str, tuple[float, CachedAnswer]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: str, now: float | None = None) -> CachedAnswer | None:
        now = time.monotonic() if now is None else now
        entry = self._entries.get(key)
        if entry is None or entry[0] < now:
            self._entries.pop(key, None)
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[1]

    def put(self, key: str, answer: CachedAnswer, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._entries[key] = (now + self.ttl_s, answer)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
