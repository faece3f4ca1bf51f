"""What grammar-constrained decoding costs per token (issue 20): the same decode loop with and without a grammar.

One process, the engine's own pieces: a Scheduler and one StageWorker holding all of SmolLM2's layers
(the last stage's sampler included) and the GrammarCompiler of the replica. Each round runs `--batch`
sequences of one chat prompt for exactly `--tokens` tokens: free (ignore_eos, no mask) and under a JSON
schema whose answer is exactly that long (an object holding an array of one-digit integers, so both runs
decode the same number of tokens). Per mode: ms per generated token (wall time / tokens) and, for the
grammar run, the coordinator's mask time (accept + fill, per token) and the last stage's mask application
(per sampled row). Modes alternate over `--rounds`, the median is reported. In the served pipeline the
mask is filled on the coordinator while the stages compute other micro-batches; here it is serial, so
the difference is an upper bound. Prints a table and writes JSON with --out.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark's helpers


def digits_schema(count: int) -> dict[str, Any]:
    array: dict[str, Any] = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}}
    array |= {"minItems": count, "maxItems": count}
    return {"type": "object", "properties": {"digits": array}, "required": ["digits"], "additionalProperties": False}


def run_round(worker: Any, prompt: list[int], batch: int, tokens: int, grammar: Any, compiler: Any) -> dict:
    import serve_apps.engine.stage_worker as stage_worker
    from serve_apps.engine.messages import SamplingParams
    from serve_apps.engine.scheduler import Scheduler, SchedulerLimits, Sequence

    timer = _Timed(stage_worker)
    scheduler = Scheduler(SchedulerLimits(batch, batch, batch, 4096), eos_token_ids=(2,))
    for i in range(batch):
        constraint = _TimedConstraint(compiler.constraint(grammar)) if grammar is not None else None
        sampling = SamplingParams(max_tokens=tokens, temperature=0.7, seed=i, ignore_eos=grammar is None)
        scheduler.add(Sequence(f"s{i}", list(prompt), sampling, 4096, constraint=constraint))
    # Prefill first (not timed): the comparison is about decode steps.
    first = scheduler.schedule()
    scheduler.update(worker.forward(first))
    timer.reset()
    masks: list[Any] = [s.constraint for s in scheduler.running.values() if s.constraint is not None]
    for timed in masks:
        timed.seconds = 0.0
    generated, started = 0, time.perf_counter()
    while scheduler.running:
        step = scheduler.schedule()
        if step is None:
            break
        generated += len(scheduler.update(worker.forward(step)))
    wall = time.perf_counter() - started
    timer.restore()
    return {
        "ms_per_token": wall / generated * 1e3,
        "tokens": generated,
        "coordinator_us_per_token": sum(c.seconds for c in masks) / generated * 1e6 if masks else 0.0,
        "apply_us_per_token": timer.seconds / generated * 1e6,
    }


class _TimedConstraint:
    def __init__(self, inner: Any) -> None:
        self.inner, self.seconds = inner, 0.0

    def next_mask(self) -> bytes:
        started = time.perf_counter()
        try:
            return self.inner.next_mask()
        finally:
            self.seconds += time.perf_counter() - started

    def accept(self, token: int) -> bool:
        started = time.perf_counter()
        try:
            return self.inner.accept(token)
        finally:
            self.seconds += time.perf_counter() - started

    @property
    def terminated(self) -> bool:
        return self.inner.terminated


class _Timed:
    """Times stage_worker's apply_token_masks (the last stage's share)."""

    def __init__(self, module: Any) -> None:
        self.module, self.original, self.seconds = module, module.apply_token_masks, 0.0

        def timed(*args: Any) -> Any:
            started = time.perf_counter()
            try:
                return self.original(*args)
            finally:
                self.seconds += time.perf_counter() - started

        module.apply_token_masks = timed

    def reset(self) -> None:
        self.seconds = 0.0

    def restore(self) -> None:
        self.module.apply_token_masks = self.original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=None, help="converted model dir (default: SmolLM2's)")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--digits", type=int, default=30, help="array length of the schema's answer")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    import torch
    from grammar_bench import default_model_dir
    from transformers import AutoConfig, AutoTokenizer

    from serve_apps.engine.grammar import GrammarCompiler
    from serve_apps.engine.layer_split import split_layers
    from serve_apps.engine.messages import GrammarSpec
    from serve_apps.engine.stage_worker import StageConfig, StageWorker

    torch.set_num_threads(args.threads)
    model_dir = args.model_dir or default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    batches = [int(b) for b in args.batches.split(",")]
    (spec,) = split_layers(int(config.num_hidden_layers), 1)
    worker = StageWorker(StageConfig(str(model_dir), spec, "bfloat16", max(batches), 1024, args.threads))
    compiler = GrammarCompiler(tokenizer, int(config.vocab_size), (2,))
    grammar = compiler.compile(GrammarSpec("json_schema", json.dumps(digits_schema(args.digits))))
    message = [{"role": "user", "content": "List thirty digits as JSON."}]
    encoded: Any = tokenizer.apply_chat_template(message, add_generation_prompt=True, tokenize=True, return_dict=True)
    prompt = [int(t) for t in encoded["input_ids"]]
    # The grammar's answer is exactly this many tokens: `{"digits": [d, d, ...]}` + EOS.
    probe = run_round(worker, prompt, 1, 4 * args.digits + 16, grammar, compiler)
    tokens = probe["tokens"] - 1  # the free run samples one token in the prefill, like the grammar run
    results: dict[str, Any] = {"model_dir": str(model_dir), "threads": args.threads, "tokens": tokens, "rows": []}
    for batch in batches:
        samples: dict[str, list[dict]] = {"free": [], "grammar": []}
        for _ in range(args.rounds):
            samples["free"].append(run_round(worker, prompt, batch, tokens + 1, None, compiler))
            samples["grammar"].append(run_round(worker, prompt, batch, tokens + 1, grammar, compiler))
        row = {"batch": batch}
        for mode, runs in samples.items():
            for key in ("ms_per_token", "coordinator_us_per_token", "apply_us_per_token"):
                row[f"{mode}_{key}"] = round(statistics.median(r[key] for r in runs), 3)
            row[f"{mode}_tokens"] = runs[0]["tokens"]
        results["rows"].append(row)
    print_table(results)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


def print_table(results: dict[str, Any]) -> None:
    print(
        "| batch | tokens free / grammar | ms/token free | ms/token grammar | difference "
        "| coordinator mask µs/token | last-stage apply µs/token |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results["rows"]:
        diff = r["grammar_ms_per_token"] - r["free_ms_per_token"]
        print(
            f"| {r['batch']} | {r['free_tokens']} / {r['grammar_tokens']} | {r['free_ms_per_token']:.3f} | "
            f"{r['grammar_ms_per_token']:.3f} | {diff:+.3f} ({diff / r['free_ms_per_token']:+.1%}) | "
            f"{r['grammar_coordinator_us_per_token']:.1f} | {r['grammar_apply_us_per_token']:.1f} |"
        )


if __name__ == "__main__":
    main()
