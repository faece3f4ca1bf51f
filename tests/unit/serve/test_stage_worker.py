"""Greedy decoding through N in-process stages equals Hugging Face generate, token for token."""

from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from serve_apps.engine.layer_split import split_layers
from serve_apps.engine.messages import SamplingParams, SeqChunk, StepBatch, StepResult
from serve_apps.engine.stage_worker import StageConfig, StageWorker

PROMPT = [5, 17, 99, 3, 250, 8, 41]
NEW_TOKENS = 12


def run_pipeline(workers: list[StageWorker], prompt: list[int], new_tokens: int, chunk: int | None = None) -> list[int]:
    greedy = SamplingParams(temperature=0.0, max_tokens=new_tokens)
    out: list[int] = []
    pieces = [prompt[i : i + chunk] for i in range(0, len(prompt), chunk)] if chunk else [prompt]
    position, step = 0, 0
    for index, piece in enumerate(pieces):
        result = forward(
            workers,
            StepBatch(step, (SeqChunk("s", 0, position, tuple(piece), greedy, sample=index == len(pieces) - 1),)),
        )
        position, step = position + len(piece), step + 1
    out.append(result.token_ids[0])
    while len(out) < new_tokens:
        result = forward(workers, StepBatch(step, (SeqChunk("s", 0, position, (out[-1],), greedy),)))
        position, step = position + 1, step + 1
        out.append(result.token_ids[0])
    return out


def forward(workers: list[StageWorker], batch: StepBatch) -> StepResult:
    hidden = None
    for worker in workers:
        hidden = worker.forward(batch, hidden)
    assert isinstance(hidden, StepResult)
    return hidden


def make_workers(
    model_dir: Path, stages: int, slots: int = 4, dtype: str = "float32", device: str = "cpu"
) -> list[StageWorker]:
    return [
        StageWorker(StageConfig(str(model_dir), spec, dtype, slots, 128, 1, device=device))  # type: ignore[arg-type]
        for spec in split_layers(6 if "untied" not in str(model_dir) else 4, stages)
    ]


def reference(model_dir: Path, prompt: list[int], new_tokens: int, dtype: torch.dtype = torch.float32) -> list[int]:
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype)
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0
    )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("stages", [1, 2, 3])
def test_greedy_equals_unsharded_generate(tiny_dir: Path, stages: int, stage_device: str) -> None:
    workers = make_workers(tiny_dir, stages, device=stage_device)
    assert run_pipeline(workers, PROMPT, NEW_TOKENS) == reference(tiny_dir, PROMPT, NEW_TOKENS)


def test_bfloat16_pipeline_equals_bfloat16_generate(tiny_dir: Path) -> None:
    workers = make_workers(tiny_dir, 2, dtype="bfloat16")
    assert run_pipeline(workers, PROMPT, NEW_TOKENS) == reference(tiny_dir, PROMPT, NEW_TOKENS, torch.bfloat16)


def test_untied_lm_head_is_loaded_from_its_own_tensor(tiny_untied_dir: Path) -> None:
    assert run_pipeline(make_workers(tiny_untied_dir, 2), PROMPT, 8) == reference(tiny_untied_dir, PROMPT, 8)


def test_chunked_prefill_matches_single_prefill(tiny_dir: Path, stage_device: str) -> None:
    workers = make_workers(tiny_dir, 2, device=stage_device)
    alone = run_pipeline(make_workers(tiny_dir, 2, device=stage_device), PROMPT, 6)
    assert run_pipeline(workers, PROMPT, 6, chunk=3) == alone


def test_batched_decode_matches_each_sequence_alone(tiny_dir: Path, stage_device: str) -> None:
    prompts = [[5, 17, 99], [7, 7, 7, 7, 7, 300], [1, 2]]
    alone = [run_pipeline(make_workers(tiny_dir, 2, device=stage_device), p, 6) for p in prompts]
    workers, greedy = make_workers(tiny_dir, 2, device=stage_device), SamplingParams(temperature=0.0)
    outs: list[list[int]] = []
    for slot, prompt in enumerate(prompts):
        outs.append(
            [forward(workers, StepBatch(slot, (SeqChunk(f"s{slot}", slot, 0, tuple(prompt), greedy),))).token_ids[0]]
        )
    for step in range(5):
        chunks = tuple(
            SeqChunk(f"s{i}", i, len(p) + len(outs[i]) - 1, (outs[i][-1],), greedy) for i, p in enumerate(prompts)
        )
        for i, token in enumerate(forward(workers, StepBatch(100 + step, chunks)).token_ids):
            outs[i].append(token)
    assert outs == alone


def test_each_stage_holds_only_its_layers(tiny_dir: Path) -> None:
    workers = make_workers(tiny_dir, 3)
    infos = [w.describe() for w in workers]
    assert [(i.layer_start, i.layer_end) for i in infos] == [(0, 2), (2, 4), (4, 6)]
    assert [i.has_embedding for i in infos] == [True, False, False]
    assert [i.has_lm_head for i in infos] == [False, False, True]
    model = LlamaForCausalLM.from_pretrained(tiny_dir)
    full = sum(p.numel() for p in model.parameters())
    per_layer = sum(p.numel() for p in model.model.layers[0].parameters())
    embedding = workers[0].model.embed_tokens.weight.numel()
    assert sum(i.param_count for i in infos) == full + embedding  # the tied lm_head is a copy
    assert infos[1].param_count == 2 * per_layer
    assert infos[0].param_count == 2 * per_layer + embedding


def test_a_middle_stage_refuses_to_run_without_hidden_states(tiny_dir: Path) -> None:
    worker = make_workers(tiny_dir, 2)[1]
    batch = StepBatch(0, (SeqChunk("s", 0, 0, (1, 2), SamplingParams()),))
    with pytest.raises(ValueError, match="hidden states"):
        worker.forward(batch, None)


def test_kv_capacity_is_enforced(tiny_dir: Path) -> None:
    worker = make_workers(tiny_dir, 1)[0]
    batch = StepBatch(0, (SeqChunk("s", 0, 127, (1, 2), SamplingParams()),))
    with pytest.raises(ValueError, match="KV capacity"):
        worker.forward(batch)


def test_a_step_may_mix_decodes_on_scattered_slots_with_a_prefill_chunk(tiny_dir: Path, stage_device: str) -> None:
    # Slots 3 and 0 decode (out of slot order, not one contiguous run) while slot 2's prompt is prefilled
    # in the same step: every sequence still gets exactly the tokens it gets alone.
    prompts = {3: [5, 17, 99], 0: [7, 7, 7, 7, 7, 300], 2: [1, 2, 3, 4]}
    alone = {slot: run_pipeline(make_workers(tiny_dir, 2, device=stage_device), p, 4) for slot, p in prompts.items()}
    workers, greedy = make_workers(tiny_dir, 2, device=stage_device), SamplingParams(temperature=0.0)
    outs: dict[int, list[int]] = {}
    for slot in (3, 0):
        chunk = SeqChunk(f"s{slot}", slot, 0, tuple(prompts[slot]), greedy)
        outs[slot] = [forward(workers, StepBatch(slot, (chunk,))).token_ids[0]]
    mixed = (
        SeqChunk("s3", 3, len(prompts[3]), (outs[3][-1],), greedy),
        SeqChunk("s2", 2, 0, tuple(prompts[2]), greedy),
        SeqChunk("s0", 0, len(prompts[0]), (outs[0][-1],), greedy),
    )
    result = forward(workers, StepBatch(10, mixed)).token_ids
    outs[3].append(result[0])
    outs[2] = [result[1]]
    outs[0].append(result[2])
    for step in range(2):
        chunks = tuple(
            SeqChunk(f"s{slot}", slot, len(prompts[slot]) + len(outs[slot]) - 1, (outs[slot][-1],), greedy)
            for slot in (0, 2, 3)
        )
        for slot, token in zip((0, 2, 3), forward(workers, StepBatch(20 + step, chunks)).token_ids, strict=True):
            outs[slot].append(token)
    assert {slot: outs[slot][:4] for slot in (3, 0)} == {slot: alone[slot] for slot in (3, 0)}
    assert outs[2][:3] == alone[2][:3]


def test_a_prefill_chunk_that_does_not_sample_returns_no_token(tiny_dir: Path) -> None:
    workers = make_workers(tiny_dir, 1)
    chunk = SeqChunk("s", 0, 0, (5, 17, 99), SamplingParams(temperature=0.0), sample=False)
    assert forward(workers, StepBatch(0, (chunk,))).token_ids == (-1,)
