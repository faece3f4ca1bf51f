import torch

from serve_apps.engine.detokenizer import Detokenizer
from serve_apps.engine.messages import SamplingParams
from serve_apps.engine.sampling import Sampler, filtered_probs


def test_greedy_and_top_k_1_pick_the_argmax() -> None:
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 1.0, 0.0]])
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_k=1)]
    assert Sampler().sample(logits, ["a", "b"], params) == [1, 0]


def test_seeded_sampling_is_reproducible_and_seed_dependent() -> None:
    logits = torch.zeros(1, 1000)

    def draw(seed: int) -> list[int]:
        sampler = Sampler()
        params = [SamplingParams(temperature=1.0, seed=seed)]
        return [sampler.sample(logits, ["s"], params, [position])[0] for position in range(5)]

    assert draw(1) == draw(1)
    assert draw(1) != draw(2)


def test_seeded_draws_depend_only_on_seed_and_position() -> None:
    """A last stage restarted mid-sequence (fresh Sampler) resumes the very same draws."""
    logits = torch.zeros(1, 1000)
    params = [SamplingParams(temperature=0.9, seed=7)]
    original = Sampler()
    first = [original.sample(logits, ["s"], params, [p])[0] for p in range(10, 20)]
    restarted = Sampler()
    resumed = [restarted.sample(logits, ["s"], params, [p])[0] for p in range(15, 20)]
    assert resumed == first[5:]
    assert len(set(first)) > 1


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    probs = filtered_probs(torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])), 1.0, 0, 0.75)
    assert probs[2] == 0 and probs[3] == 0
    assert torch.isclose(probs[:2].sum(), torch.tensor(1.0))


class CharTokenizer:
    """One character per token id; 0xFF bytes emulate a partial UTF-8 character."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join("\ufffd" if i == 0xFF else chr(i) for i in ids)


def feed(detok: Detokenizer, text: str) -> list[str]:
    return [detok.add(ord(ch), final=i == len(text) - 1) for i, ch in enumerate(text)]


def test_text_is_streamed_and_reassembles() -> None:
    detok = Detokenizer(CharTokenizer())
    assert "".join(feed(detok, "hello world")) == "hello world"


def test_stop_string_across_tokens_is_cut_and_never_emitted() -> None:
    detok = Detokenizer(CharTokenizer(), stop=("END",))
    deltas = feed(detok, "abcENDxyz")
    assert "".join(deltas) == "abc" and detok.stopped
    assert all("E" not in d for d in deltas)


def test_possible_stop_prefix_is_held_back_then_released() -> None:
    detok = Detokenizer(CharTokenizer(), stop=("END",))
    assert detok.add(ord("a")) == "a"
    assert detok.add(ord("E")) == ""
    assert detok.add(ord("x")) == "Ex"


def test_partial_utf8_is_held_back() -> None:
    detok = Detokenizer(CharTokenizer())
    assert detok.add(ord("a")) == "a"
    assert detok.add(0xFF) == ""
