"""Embeddings through the sharded stages: the mean of the final-normed hidden states, as transformers has them."""

from pathlib import Path

import pytest
import torch
from transformers import LlamaModel

from serve_apps.engine.messages import SamplingParams, SeqChunk, StepBatch, StepResult
from serve_apps.engine.scheduler import Scheduler, SchedulerLimits, Sequence
from serve_apps.stagehost.wire import FrameLimits, WireError, check_result, decode_reply, encode_reply
from tests.unit.serve.test_stage_worker import forward, make_workers

EMBED = SamplingParams(max_tokens=1, temperature=0.0, embed=True)
PROMPTS = [[5, 17, 99, 3, 250, 8, 41], [7, 7, 300], [1]]


def reference(model_dir: Path, prompt: list[int]) -> torch.Tensor:
    """transformers' own model: the final-normed hidden states, mean-pooled and L2-normalised."""
    model = LlamaModel.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        hidden = model(torch.tensor([prompt])).last_hidden_state[0]
    return torch.nn.functional.normalize(hidden.mean(dim=0), dim=0)


def embed_all(workers: list, prompts: list[list[int]], chunk: int = 512) -> list[torch.Tensor]:
    """Every prompt through the scheduler together (prefill chunks of `chunk` tokens per step)."""
    scheduler = Scheduler(SchedulerLimits(4, 8, 8, prefill_chunk=chunk), eos_token_ids=(0,))
    for i, prompt in enumerate(prompts):
        scheduler.add(Sequence(f"e{i}", prompt, EMBED, 128))
    results: dict[str, tuple[float, ...]] = {}
    while (batch := scheduler.schedule()) is not None:
        for update in scheduler.update(forward(workers, batch)):
            assert update.token_id == -1 and update.finish_reason == "stop" and update.embedding is not None
            results[update.seq_id] = update.embedding
    assert not scheduler.running and not scheduler.waiting
    return [torch.tensor(results[f"e{i}"]) for i in range(len(prompts))]


@pytest.mark.parametrize("stages", [1, 2])
def test_embedding_equals_mean_pooled_transformers_hidden_states(tiny_dir: Path, stages: int) -> None:
    for got, prompt in zip(embed_all(make_workers(tiny_dir, stages), PROMPTS), PROMPTS, strict=True):
        assert torch.allclose(got, reference(tiny_dir, prompt), atol=1e-5)
        assert abs(float(got.norm()) - 1.0) < 1e-5


def test_chunked_prefill_pools_over_every_chunk(tiny_dir: Path) -> None:
    whole = embed_all(make_workers(tiny_dir, 2), PROMPTS)
    chunked = embed_all(make_workers(tiny_dir, 2), PROMPTS, chunk=3)  # the 7-token prompt spans 3 steps
    for a, b in zip(whole, chunked, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_embeddings_and_generation_share_a_step(tiny_dir: Path) -> None:
    workers = make_workers(tiny_dir, 2)
    greedy = SamplingParams(temperature=0.0, max_tokens=4)
    batch = StepBatch(0, (SeqChunk("g", 0, 0, (5, 17, 99), greedy), SeqChunk("e", 1, 0, (7, 7, 300), EMBED)))
    result = forward(workers, batch)
    assert result.token_ids[0] >= 0 and result.token_ids[1] == -1
    assert result.pooled[0] is None
    assert torch.allclose(torch.tensor(result.pooled[1]), reference(tiny_dir, [7, 7, 300]), atol=1e-5)


def test_a_replay_from_position_zero_starts_the_pool_again(tiny_dir: Path) -> None:
    workers = make_workers(tiny_dir, 1)
    first = SeqChunk("e", 0, 0, (5, 17, 99), EMBED, sample=False)
    forward(workers, StepBatch(0, (first,)))  # the pipeline was lost here: the prompt is sent again
    forward(workers, StepBatch(1, (first,)))
    last = forward(workers, StepBatch(2, (SeqChunk("e", 0, 3, (3, 250), EMBED),)))
    assert torch.allclose(torch.tensor(last.pooled[0]), reference(tiny_dir, [5, 17, 99, 3, 250]), atol=1e-5)


LIMITS = FrameLimits(hidden_size=4, vocab_size=100, kv_slots=4, max_len=64, max_step_tokens=64, max_chunks=4)


def test_pooled_embeddings_cross_the_stage_protocol_and_are_checked() -> None:
    batch = StepBatch(3, (SeqChunk("g", 0, 0, (1, 2), SamplingParams()), SeqChunk("e", 1, 0, (3,), EMBED)))
    result = StepResult(3, (9, -1), pooled=(None, (0.5, 0.5, 0.5, 0.5)))
    decoded = decode_reply(encode_reply(3, result), LIMITS, batch)
    assert decoded == result
    check_result(decoded, batch, LIMITS)
    for bad in (
        StepResult(3, (9, 4), pooled=(None, (0.5, 0.5, 0.5, 0.5))),  # a token for an embedding
        StepResult(3, (9, -1)),  # no embedding where one was asked
        StepResult(3, (9, -1), pooled=((1.0, 0.0, 0.0, 0.0), (0.5, 0.5, 0.5, 0.5))),  # one where none was
        StepResult(3, (9, -1), pooled=(None, (0.5, 0.5, 0.5))),  # not the model's width
        StepResult(3, (9, -1), pooled=(None, (float("nan"), 0.5, 0.5, 0.5))),
    ):
        with pytest.raises(WireError):
            decode_reply(encode_reply(3, bad), LIMITS, batch)
