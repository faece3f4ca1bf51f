"""Grammar-constrained decoding on the coordinator: compile a request's grammar, track each sequence in it.

The library is xgrammar (bench/grammar_bench.py, docs/benchmarks.md "Constrained decoding"): on SmolLM2's
tokenizer it fills a next-token mask in ~2-3 µs per token at the median (llguidance ~7-10 µs,
outlines-core 0.6-70 µs and seconds to compile a generic JSON object) and compiles a schema in ~5 ms;
it is what vLLM and SGLang use by default and is actively maintained.

Who does what: the replica (`GrammarCompiler`, one per tokenizer) compiles a `GrammarSpec` once per
request; each sequence gets a `TokenConstraint`. The scheduler accepts every sampled token into it and,
right after the step's result arrived (while the other micro-batches' steps compute on the stages),
fills the next mask, which travels with the sequence's next chunk to the last stage
(`token_mask.apply_token_masks`). The mask is never computed on a stage, so a stage needs no grammar
library and the mask costs the pipeline no stage time.
"""

import json
import logging
import threading
from typing import Any

import torch

from serve_apps.engine.messages import GrammarSpec

logger = logging.getLogger(__name__)


class GrammarError(ValueError):
    """The grammar (a JSON schema) cannot be compiled: the request's fault, a 400."""


class GrammarCompiler:
    """Compiles grammars for one tokenizer; compiled grammars are cached by the library (per schema)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: tuple[int, ...]) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        self.vocab_size = vocab_size
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids))
        # One thread: the replica's CPUs belong to its stages; a schema compiles in milliseconds.
        self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_limit_bytes=64 << 20)
        self._lock = threading.Lock()  # compiles run in worker threads (asyncio.to_thread)

    def compile(self, spec: GrammarSpec) -> Any:
        """The compiled grammar of `spec` (GrammarError when its schema is not one xgrammar can compile)."""
        if spec.kind == "json_object":
            schema = '{"type": "object"}'
        elif spec.kind == "json_schema" and spec.schema is not None:
            schema = spec.schema
        else:
            raise GrammarError(f"unknown grammar {spec.kind!r}")
        try:
            json.loads(schema)
            with self._lock:
                # Compact JSON (no free whitespace): a small model can otherwise spend its tokens on spaces.
                return self._compiler.compile_json_schema(schema, any_whitespace=False, strict_mode=True)
        except (ValueError, RuntimeError, TypeError) as exc:
            raise GrammarError(f"the JSON schema cannot be compiled: {exc}") from None

    def constraint(self, compiled: Any) -> "TokenConstraint":
        return TokenConstraint(self._xgr, compiled, self.vocab_size)


class TokenConstraint:
    """One sequence's place in its grammar: the mask of its next token, advanced by each sampled token."""

    def __init__(self, xgr: Any, compiled: Any, vocab_size: int) -> None:
        self._matcher = xgr.GrammarMatcher(compiled)
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self.refused: int | None = None  # the first token the grammar did not allow (a stage ignored the mask)

    def next_mask(self) -> bytes:
        """The allowed next tokens as packed int32 words (token_mask.py's layout)."""
        self._matcher.fill_next_token_bitmask(self._bitmask)
        return _bytes(self._bitmask)

    def accept(self, token: int) -> bool:
        """Advance by `token`; False (and nothing advanced) when the grammar does not allow it."""
        if self._matcher.accept_token(token):
            return True
        self.refused = token
        return False

    @property
    def terminated(self) -> bool:
        """The grammar is complete and its stop token was accepted: nothing may follow."""
        return bool(self._matcher.is_terminated())


def _bytes(bitmask: torch.Tensor) -> bytes:
    return bitmask[0].numpy().tobytes()
