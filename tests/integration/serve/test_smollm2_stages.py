"""SmolLM2 (real weights) through 1, 2 and 3 in-process stages equals unsharded transformers generate."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cluster.models import load_catalogue, materialize
from serve_apps.engine.layer_split import split_layers
from serve_apps.engine.messages import SamplingParams, SeqChunk, StepBatch, StepResult
from serve_apps.engine.stage_worker import StageConfig, StageWorker

NEW_TOKENS = 16


@pytest.fixture(scope="module", params=["smollm2-135m-instruct-fp32", "smollm2-135m-instruct"])
def smollm2(
    request: pytest.FixtureRequest, repo_root: Path, model_cache_dir: Path
) -> tuple[Path, str, list[int], list[int]]:
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
    return path, spec.dtype, prompt, out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("stages", [1, 2, 3])
def test_greedy_through_stages_equals_generate(smollm2: tuple, stages: int) -> None:
    path, dtype, prompt, expected = smollm2
    workers = [StageWorker(StageConfig(str(path), spec, dtype, 1, 256, 2)) for spec in split_layers(30, stages)]
    greedy = SamplingParams(temperature=0.0, ignore_eos=True)
    tokens, position, current = [], 0, prompt
    for step in range(NEW_TOKENS):
        result = None
        for worker in workers:
            result = worker.forward(StepBatch(step, (SeqChunk("s", 0, position, tuple(current), greedy),)), result)
        assert isinstance(result, StepResult)
        position += len(current)
        tokens.append(result.token_ids[0])
        current = [tokens[-1]]
    assert tokens == expected
