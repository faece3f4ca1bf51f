"""SmolLM2 (real weights) through 1, 2 and 3 in-process stages decodes what unsharded transformers generates.

Teacher-forced on transformers' own greedy tokens, the stages must pick the same token at every step,
except where transformers' own top two logits are a tie at the dtype's resolution (bfloat16 logits near
16 are 0.125 apart: a different but equally exact order of additions may break such a tie either way).
"""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cluster.models import load_catalogue, materialize
from serve_apps.engine.layer_split import split_layers
from serve_apps.engine.messages import SamplingParams, SeqChunk, StepBatch, StepResult
from serve_apps.engine.stage_worker import StageConfig, StageWorker

NEW_TOKENS = 16
TIE = {"float32": 1e-3, "bfloat16": 0.25}  # top-2 logit margins below this are ties at the dtype's precision


@pytest.fixture(scope="module", params=["smollm2-135m-instruct-fp32", "smollm2-135m-instruct"])
def smollm2(
    request: pytest.FixtureRequest, repo_root: Path, model_cache_dir: Path
) -> tuple[Path, str, list[int], list[int], list[float]]:
    spec = load_catalogue(repo_root / "configs" / "models.yaml").get(request.param)
    path = materialize(spec, model_cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name a large ocean."}], tokenize=False, add_generation_prompt=True
    )
    prompt = tokenizer.encode(text, add_special_tokens=False)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, spec.dtype))
    out = model.generate(
        torch.tensor([prompt]),
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        pad_token_id=tokenizer.eos_token_id,
    )
    with torch.no_grad():
        top2 = model(out).logits[0, len(prompt) - 1 : -1].float().topk(2, dim=-1).values
    margins = (top2[:, 0] - top2[:, 1]).tolist()
    return path, spec.dtype, prompt, out[0, len(prompt) :].tolist(), margins


@pytest.mark.parametrize(("stages", "quant"), [(1, "none"), (2, "none"), (3, "none"), (2, "int4")])
def test_greedy_through_stages_equals_generate(smollm2: tuple, stages: int, quant: str) -> None:
    # int4: decode steps read the GGUF's own 4-bit layer weights and an int8 lm_head, so beyond ties
    # at the dtype's precision it may differ where transformers' top two logits are within a unit.
    path, dtype, prompt, expected, margins = smollm2
    workers = [
        StageWorker(StageConfig(str(path), spec, dtype, 1, 256, 2, weight_quant=quant, low_bit_max_tokens=6))  # type: ignore[arg-type]
        for spec in split_layers(30, stages)
    ]
    greedy = SamplingParams(temperature=0.0, ignore_eos=True)
    tokens, position, current = [], 0, prompt
    for step in range(NEW_TOKENS):
        result = None
        for worker in workers:
            result = worker.forward(StepBatch(step, (SeqChunk("s", 0, position, tuple(current), greedy),)), result)
        assert isinstance(result, StepResult)
        position += len(current)
        tokens.append(result.token_ids[0])
        current = [expected[step]]  # teacher-forced: the next step sees transformers' token
    tie = TIE[dtype] if quant == "none" else 1.0
    decided = [step for step in range(NEW_TOKENS) if margins[step] > tie]
    assert len(decided) >= NEW_TOKENS // 2
    assert [tokens[step] for step in decided] == [expected[step] for step in decided]
