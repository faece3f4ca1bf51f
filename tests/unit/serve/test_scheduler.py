"""The scheduler fed hand-made step results: no model, no Ray."""

import pytest

from serve_apps.engine.messages import SamplingParams, StepBatch, StepResult
from serve_apps.engine.scheduler import QueueFullError, Scheduler, SchedulerLimits, SeqStatus, Sequence

EOS = 2


def seq(seq_id: str, prompt: int = 3, max_tokens: int = 4, max_len: int = 64, **kw: object) -> Sequence:
    return Sequence(seq_id, list(range(10, 10 + prompt)), SamplingParams(max_tokens=max_tokens, **kw), max_len)


def sched(slots: int = 2, batch: int = 8, queue: int = 4, chunk: int = 512) -> Scheduler:
    return Scheduler(SchedulerLimits(slots, batch, queue, chunk), (EOS,))


def answer(s: Scheduler, batch: StepBatch, token: int = 7) -> list:
    return s.update(StepResult(batch.step_id, tuple(token if c.sample else -1 for c in batch.chunks)))


def test_prefill_then_decode_until_max_tokens() -> None:
    s = sched()
    s.add(seq("a", max_tokens=3))
    prefill = s.schedule()
    assert prefill is not None and len(prefill.chunks) == 1
    assert prefill.chunks[0].token_ids == (10, 11, 12) and prefill.chunks[0].start_pos == 0
    answer(s, prefill)
    decode = s.schedule()
    assert decode.chunks[0].token_ids == (7,) and decode.chunks[0].start_pos == 3
    answer(s, decode)
    updates = answer(s, s.schedule())
    assert updates[-1].finish_reason == "length"
    assert not s.running and s.schedule() is not None  # the release step frees stage state
    assert s.schedule() is None


def prefill_all(s: Scheduler) -> None:
    """Run steps until every resident sequence has its prompt cached and one token sampled."""
    answer(s, s.schedule())
    while any(not q.output_ids for q in s.running.values()):
        answer(s, s.schedule())


def test_eos_finishes_unless_ignored() -> None:
    s = sched()
    s.add(seq("a", max_tokens=10))
    s.add(seq("b", max_tokens=10, ignore_eos=True))
    prefill_all(s)
    updates = answer(s, s.schedule(), token=EOS)
    assert {u.seq_id: u.finish_reason for u in updates} == {"a": "stop", "b": None}


def test_slots_bound_resident_sequences_and_queue_bounds_waiting() -> None:
    s = sched(slots=2, queue=2)
    for name in "abcd":
        s.add(seq(name))
    with pytest.raises(QueueFullError):
        s.add(seq("e"))
    s.schedule()
    assert len(s.running) == 2 and s.num_waiting == 2


def test_finished_sequence_releases_its_slot_to_a_waiting_one() -> None:
    s = sched(slots=1)
    s.add(seq("a", max_tokens=1))
    s.add(seq("b", max_tokens=1))
    first = s.schedule()
    assert [c.seq_id for c in first.chunks] == ["a"]
    assert answer(s, first)[0].finish_reason == "length"
    second = s.schedule()
    assert [c.seq_id for c in second.chunks] == ["b"] and second.chunks[0].slot == first.chunks[0].slot
    assert second.released_slots == (("a", first.chunks[0].slot),)


def test_new_prompts_are_prefilled_beside_the_running_decodes() -> None:
    s = sched(slots=4)
    s.add(seq("a", max_tokens=50))
    answer(s, s.schedule())
    s.add(seq("b", max_tokens=50))
    s.add(seq("c", max_tokens=50))
    batch = s.schedule()
    # a keeps decoding while both new prompts are prefilled, all in one step.
    assert [(c.seq_id, c.start_pos, len(c.token_ids)) for c in batch.chunks] == [("a", 3, 1), ("b", 0, 3), ("c", 0, 3)]
    answer(s, batch)
    assert sorted(c.seq_id for c in s.schedule().chunks) == ["a", "b", "c"]


def test_prefills_share_the_token_budget_first_come_first() -> None:
    s = sched(slots=4, chunk=8)
    for name in "abc":
        s.add(seq(name, prompt=5))
    first = s.schedule()
    # 8 prompt tokens per step: a whole (5), then 3 of b's; c waits for the next step.
    assert [(c.seq_id, c.start_pos, len(c.token_ids), c.sample) for c in first.chunks] == [
        ("a", 0, 5, True),
        ("b", 0, 3, False),
    ]
    second = s.schedule()
    assert [(c.seq_id, c.start_pos, len(c.token_ids)) for c in second.chunks] == [("c", 0, 5)]


def test_long_prompt_is_prefilled_in_chunks_and_samples_only_at_its_end() -> None:
    s = sched(chunk=4)
    s.add(seq("a", prompt=10))
    chunks, updates = [], []
    for _ in range(3):
        chunks.append(s.schedule())
        assert s.schedule() is None  # the next chunk waits for this one
        updates.append(answer(s, chunks[-1]))
    assert [c.chunks[0].start_pos for c in chunks] == [0, 4, 8]
    assert [c.chunks[0].sample for c in chunks] == [False, False, True]
    assert [len(u) for u in updates] == [0, 0, 1]


def test_decode_batch_is_capped_and_rotates() -> None:
    s = sched(slots=4, batch=2)
    for name in "abcd":
        s.add(seq(name, max_tokens=20))
    prefill_all(s)
    first = s.schedule()
    second = s.schedule()  # the first decode batch is still in flight, so the other two run
    assert len(first.chunks) == len(second.chunks) == 2
    assert {c.seq_id for c in first.chunks}.isdisjoint(c.seq_id for c in second.chunks)
    answer(s, first)
    answer(s, second)
    third = s.schedule()
    assert {c.seq_id for c in third.chunks} == {c.seq_id for c in first.chunks}


def test_abort_frees_slot_and_drops_late_tokens() -> None:
    s = sched()
    s.add(seq("a", max_tokens=10))
    batch = s.schedule()
    finished = s.finish("a", "abort")
    assert finished is not None and finished.status is SeqStatus.FINISHED
    assert answer(s, batch) == []
    release = s.schedule()
    assert release is not None and [sid for sid, _ in release.released_slots] == ["a"]


def test_context_limit_finishes_with_length() -> None:
    s = sched()
    s.add(seq("a", prompt=3, max_tokens=100, max_len=5))
    answer(s, s.schedule())
    updates = answer(s, s.schedule())
    assert updates[0].finish_reason == "length"


def test_replay_recomputes_history_without_sampling_again() -> None:
    s = sched(chunk=4)
    s.add(seq("a", prompt=3, max_tokens=10))
    prefill_all(s)
    answer(s, s.schedule(), token=8)  # outputs: [7, 8]
    assert s.replay_all() == 1
    replay = s.schedule()
    chunk = replay.chunks[0]
    # History 10 11 12 7 8: everything but the last token is recomputed; nothing is sampled.
    assert (chunk.start_pos, chunk.token_ids, chunk.sample) == (0, (10, 11, 12, 7), False)
    assert answer(s, replay) == []
    decode = s.schedule()
    assert (decode.chunks[0].start_pos, decode.chunks[0].token_ids) == (4, (8,))


def test_scheduler_splits_decodes_into_microbatches() -> None:
    s = Scheduler(SchedulerLimits(8, 8, 8, num_microbatches=3), (EOS,))
    for i in range(7):
        s.add(seq(f"s{i}", prompt=1, max_tokens=50))
    while s.waiting or not all(seq.prefilled for seq in s.running.values()):  # prefill all (decodes interleave)
        batch = s.schedule()
        assert batch is not None
        answer(s, batch)
    sizes = []
    while (batch := s.schedule()) is not None:
        sizes.append(len(batch.chunks))
    assert sizes == [3, 3, 1]
