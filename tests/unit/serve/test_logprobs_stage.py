"""Logprobs where tokens are sampled: the last stage reports the raw logits' log-softmax even under a grammar's
mask (applied in place to the sampled logits); token texts and bytes for the client on SmolLM2's tokenizer."""

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from cluster.models.materialize import tokenizer_dir
from serve_apps.engine.messages import SamplingParams, SeqChunk, StepBatch, TokenLogprobs
from serve_apps.server.scores import LOGPROB_FLOOR, TokenScorer
from tests.unit.serve.test_stage_worker import forward, make_workers

PROMPT = (5, 17, 99, 3)


def _mask_first(words: int, vocab: int) -> bytes:
    """Allows tokens [0, 32 * words) only."""
    return b"\xff" * 4 * words + b"\x00" * 4 * ((vocab + 31) // 32 - words)


def test_logprobs_are_raw_under_a_grammar_mask(tiny_dir: Path) -> None:
    workers = make_workers(tiny_dir, 2)
    everything = SamplingParams(temperature=0.0, logprobs=512)  # the whole vocabulary's raw logprobs
    free = forward(workers, StepBatch(0, (SeqChunk("a", 0, 0, PROMPT, everything),)))
    params = SamplingParams(temperature=0.0, logprobs=5)
    masked = forward(workers, StepBatch(1, (SeqChunk("b", 1, 0, PROMPT, params, token_mask=_mask_first(1, 512)),)))
    raw, under = free.logprobs[0], masked.logprobs[0]
    assert raw is not None and under is not None
    token = masked.token_ids[0]
    assert token < 32  # sampled under the mask
    reference = dict(raw.top)
    assert under.logprob == pytest.approx(reference[token], abs=1e-5)  # not renormalised over the 32 allowed
    assert [t for t, _ in under.top] == [t for t, _ in raw.top[:5]]  # the alternatives are the unmasked ones
    assert any(t >= 32 for t, _ in under.top)
    assert [lp for _, lp in under.top] == pytest.approx([lp for _, lp in raw.top[:5]], abs=1e-5)
    assert sum(torch.tensor([lp for _, lp in raw.top]).exp().tolist()) == pytest.approx(1.0, abs=1e-4)


@pytest.fixture(scope="module")
def scorer(model_cache_dir: Path) -> TokenScorer:
    return TokenScorer(AutoTokenizer.from_pretrained(tokenizer_dir(model_cache_dir)))


def test_scores_carry_token_text_and_bytes(scorer: TokenScorer) -> None:
    tokenizer = scorer.tokenizer
    (hello,) = tokenizer.encode(" hello", add_special_tokens=False)
    score = scorer.score(hello, TokenLogprobs(-0.25, ((hello, -0.25), (0, float("-inf")))))
    assert (score.token, score.bytes, score.logprob) == (" hello", tuple(b" hello"), -0.25)
    assert score.top[0].token == " hello" and score.top[1].logprob == LOGPROB_FLOOR


def test_a_token_holding_part_of_a_character_keeps_its_bytes(scorer: TokenScorer) -> None:
    tokenizer = scorer.tokenizer
    ids = tokenizer.encode("🦀", add_special_tokens=False)
    assert len(ids) > 1  # the emoji's four bytes span tokens
    joined = b"".join(bytes(scorer.text(i)[1]) for i in ids)
    assert joined == "🦀".encode()
