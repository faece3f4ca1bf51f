"""Constrained-decoding libraries on SmolLM2's tokenizer (issue 20): compile time and per-token mask cost.

For each library that imports (xgrammar, llguidance, outlines-core) and each grammar (a JSON schema of a
small record, and `json_object`: any JSON object), in one run:

- compile_ms: building the grammar's token-level form for this tokenizer (the first request of a schema
  pays it; xgrammar and llguidance cache per schema), median of `--repeats` fresh compilations;
- mask_us: filling the next-token mask (one bit per vocabulary entry) at every position of a valid
  answer, then accepting that answer's token: the work a sampler does per generated token, median over
  the answer's tokens and `--repeats` walks;
- accept_us: advancing the matcher by the sampled token alone.

The answer walked is the tokenizer's own encoding of a fixed valid JSON text, so every library sees the
same tokens. No model, no Ray. Prints a table and writes JSON with --out.
"""

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "email": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "email", "tags", "address"],
    "additionalProperties": False,
}
ANSWER = {
    "name": "Ada Lovelace",
    "age": 36,
    "email": "ada@example.org",
    "tags": ["math", "engines", "poetry"],
    "address": {"city": "London", "zip": "W1"},
}
GRAMMARS = {"json_schema": json.dumps(SCHEMA), "json_object": None}
LIBRARIES = ("xgrammar", "llguidance", "outlines-core")


class Walker:
    """One library's compile / mask / accept over one grammar (subclasses per library)."""

    def compile(self, schema: str | None) -> Any: ...

    def matcher(self, compiled: Any) -> Any: ...

    def fill(self, matcher: Any) -> None: ...

    def accept(self, matcher: Any, token: int) -> None: ...


class XGrammar(Walker):
    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self.mask = xgr.allocate_token_bitmask(1, vocab_size)

    def compile(self, schema: str | None) -> Any:
        compiler = self.xgr.GrammarCompiler(self.info, cache_enabled=False)
        return compiler.compile_builtin_json_grammar() if schema is None else compiler.compile_json_schema(schema)

    def matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matcher: Any) -> None:
        matcher.fill_next_token_bitmask(self.mask)

    def accept(self, matcher: Any, token: int) -> None:
        if not matcher.accept_token(token):
            raise RuntimeError(f"xgrammar refused token {token}")


class LLGuidance(Walker):
    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.ll = llguidance
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
        self.mask = llguidance.torch.allocate_token_bitmask(1, self.tokenizer.vocab_size)
        self.fill_mask = llguidance.torch.fill_next_token_bitmask

    def compile(self, schema: str | None) -> Any:
        source = schema if schema is not None else json.dumps({"type": "object"})
        grammar = self.ll.LLMatcher.grammar_from_json_schema(source)
        matcher = self.ll.LLMatcher(self.tokenizer, grammar)  # compiles lazily: count the first mask too
        self.fill_mask(matcher, self.mask, 0)
        return grammar

    def matcher(self, compiled: Any) -> Any:
        return self.ll.LLMatcher(self.tokenizer, compiled)

    def fill(self, matcher: Any) -> None:
        self.fill_mask(matcher, self.mask, 0)

    def accept(self, matcher: Any, token: int) -> None:
        if not matcher.consume_token(token):
            raise RuntimeError(f"llguidance refused token {token}: {matcher.get_error()}")


class OutlinesCore(Walker):
    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        import torch
        from outlines_core import Guide, Index, Vocabulary
        from outlines_core.json_schema import build_regex_from_schema

        self.Guide, self.Index, self.regex_of = Guide, Index, build_regex_from_schema
        self.vocabulary = Vocabulary(int(tokenizer.eos_token_id), _outlines_vocab(tokenizer))
        self.mask = torch.zeros((vocab_size + 31) // 32, dtype=torch.int32)
        self.eos = int(tokenizer.eos_token_id)

    def compile(self, schema: str | None) -> Any:
        # outlines-core has no generic-JSON grammar: an object with any properties is its json_object.
        regex = self.regex_of(schema if schema is not None else json.dumps({"type": "object"}))
        return self.Index(regex, self.vocabulary)

    def matcher(self, compiled: Any) -> Any:
        return self.Guide(compiled)

    def fill(self, matcher: Any) -> None:
        matcher.write_mask_into(self.mask.data_ptr(), self.mask.numel(), self.mask.element_size())

    def accept(self, matcher: Any, token: int) -> None:
        if token == self.eos and matcher.is_finished():
            return  # outlines-core leaves the end to the caller: EOS is allowed once finished, not advanced
        matcher.advance(token)


def _outlines_vocab(tokenizer: Any) -> dict[str, list[int]]:
    """Token text -> ids as outlines-core wants it (byte-level BPE tokens decoded to their text)."""
    vocab: dict[str, list[int]] = {}
    special = set(tokenizer.all_special_ids)
    for token, token_id in tokenizer.get_vocab().items():
        if token_id in special:
            continue
        text = tokenizer.convert_tokens_to_string([token])
        vocab.setdefault(text, []).append(token_id)
    return vocab


def walk(walker: Walker, compiled: Any, tokens: list[int]) -> tuple[list[float], list[float]]:
    """Seconds of each mask fill and each accept along `tokens`."""
    matcher = walker.matcher(compiled)
    fills, accepts = [], []
    for token in tokens:
        started = time.perf_counter()
        walker.fill(matcher)
        middle = time.perf_counter()
        walker.accept(matcher, token)
        fills.append(middle - started)
        accepts.append(time.perf_counter() - middle)
    return fills, accepts


def bench_library(make: Callable[[], Walker], tokens: dict[str, list[int]], repeats: int) -> dict[str, Any]:
    started = time.perf_counter()
    walker = make()
    setup_ms = (time.perf_counter() - started) * 1e3
    result: dict[str, Any] = {"tokenizer_setup_ms": round(setup_ms, 1), "grammars": {}}
    for name, schema in GRAMMARS.items():
        compile_s, compiled = [], None
        for _ in range(repeats):
            started = time.perf_counter()
            compiled = walker.compile(schema)
            compile_s.append(time.perf_counter() - started)
        fills: list[float] = []
        accepts: list[float] = []
        for _ in range(repeats):
            fill, accept = walk(walker, compiled, tokens[name])
            fills += fill
            accepts += accept
        result["grammars"][name] = {
            "compile_ms": round(statistics.median(compile_s) * 1e3, 2),
            "mask_us": round(statistics.median(fills) * 1e6, 1),
            "mask_p90_us": round(statistics.quantiles(fills, n=10)[-1] * 1e6, 1),
            "accept_us": round(statistics.median(accepts) * 1e6, 1),
            "tokens": len(tokens[name]),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=None, help="converted model dir (default: SmolLM2's)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--libraries", default=",".join(LIBRARIES))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from transformers import AutoConfig, AutoTokenizer

    model_dir = args.model_dir or default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    vocab_size = int(AutoConfig.from_pretrained(model_dir).vocab_size)
    text = json.dumps(ANSWER)
    eos = [int(tokenizer.eos_token_id)]
    tokens = {name: tokenizer.encode(text, add_special_tokens=False) + eos for name in GRAMMARS}
    makers: dict[str, Callable[[], Walker]] = {
        "xgrammar": lambda: XGrammar(tokenizer, vocab_size),
        "llguidance": lambda: LLGuidance(tokenizer, vocab_size),
        "outlines-core": lambda: OutlinesCore(tokenizer, vocab_size),
    }
    results: dict[str, Any] = {"model_dir": str(model_dir), "vocab_size": vocab_size, "libraries": {}}
    for name in args.libraries.split(","):
        try:
            results["libraries"][name] = bench_library(makers[name], tokens, args.repeats)
            results["libraries"][name]["version"] = _version(name)
        except ImportError as exc:
            results["libraries"][name] = {"error": f"not installed: {exc}"}
    print_table(results)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


def default_model_dir() -> Path:
    from cluster.config import Settings
    from cluster.models import load_catalogue, materialize

    settings = Settings()
    spec = load_catalogue(REPO_ROOT / "configs" / "models.yaml").get("smollm2-135m-instruct")
    return materialize(spec, settings.model.cache_dir)


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name.replace("-", "_") if name == "outlines-core" else name)


def print_table(results: dict[str, Any]) -> None:
    print("| library | grammar | compile ms | mask µs/token (median) | p90 | accept µs | tokenizer setup ms |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, lib in results["libraries"].items():
        if "error" in lib:
            print(f"| {name} | - | {lib['error']} | | | | |")
            continue
        for grammar, row in lib["grammars"].items():
            print(
                f"| {name} {lib['version']} | {grammar} | {row['compile_ms']} | {row['mask_us']} | "
                f"{row['mask_p90_us']} | {row['accept_us']} | {lib['tokenizer_setup_ms']} |"
            )


if __name__ == "__main__":
    main()
