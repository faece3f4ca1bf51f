"""Penalties, logit bias and logprobs of the last stage's sampler against references computed with torch."""

import torch

from serve_apps.engine.messages import SamplingParams, SeqChunk
from serve_apps.engine.sampling import Sampler, adjust_logits

VOCAB = 50


def chunk(seq: str, start: int, tokens: tuple[int, ...], params: SamplingParams, prompt: int) -> SeqChunk:
    return SeqChunk(seq, 0, start, tokens, params, output_start=prompt)


def reference(
    logits: torch.Tensor, generated: list[int], presence: float, frequency: float, bias: dict
) -> torch.Tensor:
    out = logits.clone()
    for token in range(VOCAB):
        count = generated.count(token)
        out[token] -= count * frequency + (1.0 if count else 0.0) * presence
        out[token] += bias.get(token, 0.0)
    return out


def test_penalties_and_bias_equal_the_reference() -> None:
    torch.manual_seed(0)
    logits = torch.randn(VOCAB)
    params = SamplingParams(presence_penalty=0.7, frequency_penalty=-0.4, logit_bias=((3, 5.0), (9, -100.0)))
    prompt, generated = [1, 2, 3, 3], [3, 4, 4, 7]
    sampler = Sampler()
    # The prompt (never penalized), then the generated tokens as the decodes feed them in.
    sampler.observe([chunk("s", 0, tuple(prompt), params, len(prompt))])
    for i, token in enumerate(generated):
        sampler.observe([chunk("s", len(prompt) + i, (token,), params, len(prompt))])
    expected = reference(logits, generated, 0.7, -0.4, {3: 5.0, 9: -100.0})
    got = adjust_logits(logits, params, sampler._generated["s"])
    assert torch.allclose(got, expected, atol=1e-6)


def test_a_replay_from_position_zero_counts_the_history_once() -> None:
    params = SamplingParams(frequency_penalty=1.0)
    sampler = Sampler()
    sampler.observe([chunk("s", 0, (1, 2), params, 2)])
    for i, token in enumerate((5, 5, 6)):
        sampler.observe([chunk("s", 2 + i, (token,), params, 2)])
    before = dict(sampler._generated["s"])
    sampler.observe([chunk("s", 0, (1, 2, 5, 5), params, 2)])  # replay: history but its last token
    sampler.observe([chunk("s", 4, (6,), params, 2)])
    assert dict(sampler._generated["s"]) == before == {5: 2, 6: 1}
    restarted = Sampler()  # a fresh last stage rebuilds the counts from the replay alone
    restarted.observe([chunk("s", 0, (1, 2, 5, 5), params, 2), chunk("t", 0, (3,), params, 1)])
    restarted.observe([chunk("s", 4, (6,), params, 2)])
    assert dict(restarted._generated["s"]) == before


def test_greedy_follows_the_adjusted_logits() -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, 4] = 3.0
    params = SamplingParams(temperature=0.0, logit_bias=((11, 4.0),))
    tokens, _ = Sampler().step(logits, [chunk("s", 0, (1,), params, 1)])
    assert tokens == [11]
    penalized = SamplingParams(temperature=0.0, presence_penalty=2.0, frequency_penalty=2.0)
    sampler = Sampler()
    sampler.observe([chunk("p", 0, (1,), penalized, 1), chunk("p2", 0, (1,), penalized, 1)])
    sampler.observe([chunk("p", 1, (4,), penalized, 1)])  # 4 was generated: 3.0 - 2 - 2 < 0
    tokens, _ = sampler.step(logits.repeat(1, 1), [chunk("p", 1, (4,), penalized, 1)])
    assert tokens != [4]


def test_logprobs_are_the_raw_log_softmax_with_the_top_k() -> None:
    torch.manual_seed(1)
    logits = torch.randn(2, VOCAB)
    asked = SamplingParams(temperature=0.0, logprobs=3, logit_bias=((0, 50.0),))
    plain = SamplingParams(temperature=0.0)
    tokens, scores = Sampler().step(logits, [chunk("a", 0, (1,), asked, 1), chunk("b", 0, (1,), plain, 1)])
    assert tokens[0] == 0 and scores[1] is None
    expected = torch.log_softmax(logits[0], dim=-1)  # before the bias: the model's own distribution
    assert scores[0] is not None
    assert abs(scores[0].logprob - float(expected[0])) < 1e-5
    values, ids = torch.topk(expected, 3)
    assert [t for t, _ in scores[0].top] == ids.tolist()
    assert torch.allclose(torch.tensor([v for _, v in scores[0].top]), values, atol=1e-5)


def test_logprobs_zero_reports_only_the_sampled_token() -> None:
    logits = torch.randn(1, VOCAB)
    params = SamplingParams(temperature=1.0, seed=3, logprobs=0)
    tokens, scores = Sampler().step(logits, [chunk("a", 0, (1,), params, 1)])
    assert scores[0] is not None and scores[0].top == ()
    assert abs(scores[0].logprob - float(torch.log_softmax(logits[0], -1)[tokens[0]])) < 1e-5
