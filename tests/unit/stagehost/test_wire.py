"""The stage protocol's codec: exact round trips, every limit enforced, and a decoder that, whatever bytes
it is fed, returns a valid message or raises WireError (never anything else, never unpickles)."""

import asyncio
import contextlib
import socket
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from serve_apps.engine.layer_split import split_layers
from serve_apps.engine.messages import SamplingParams, SeqChunk, StepBatch, StepResult, TokenLogprobs
from serve_apps.stagehost import stage_pb2 as pb
from serve_apps.stagehost.wire import (
    DTYPES,
    SCHEMA_VERSION,
    Expect,
    FrameLimits,
    LinkError,
    WireError,
    decode_link_frame,
    decode_reply,
    decode_request,
    encode_link_frame,
    encode_reply,
    encode_request,
    read_message,
    read_message_async,
    request_to_proto,
    weights_digest,
    write_message,
)

LIMITS = FrameLimits(hidden_size=16, vocab_size=100, kv_slots=4, max_len=64, max_step_tokens=32, max_chunks=4)
MIDDLE = Expect(first=False, last=False, dtype="float32")
SAMPLED = SamplingParams(temperature=0.7, top_p=0.9, top_k=5, seed=42, stop_token_ids=(3, 4), ignore_eos=True)


def batch(step_id: int = 1) -> StepBatch:
    return StepBatch(
        step_id,
        (SeqChunk("a", 0, 0, (1, 2, 3), SamplingParams(temperature=0.0)), SeqChunk("b", 3, 10, (99,), SAMPLED, False)),
        (("gone", 2),),
    )


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_a_step_and_its_hidden_states_round_trip_exactly(dtype: str) -> None:
    hidden = torch.randn(4, 16).to(DTYPES[dtype])
    step, out = decode_request(encode_request(batch(), hidden), LIMITS, Expect(first=False, dtype=dtype))
    assert step == batch() and out is not None and out.dtype == hidden.dtype and torch.equal(out, hidden)
    out.add_(1)  # a writable tensor of its own


def test_replies_round_trip() -> None:
    hidden = torch.randn(4, 16)
    assert torch.equal(decode_reply(encode_reply(1, hidden), LIMITS, batch(), MIDDLE), hidden)  # type: ignore[arg-type]
    assert decode_reply(encode_reply(1, StepResult(1, (7, -1))), LIMITS, batch()) == StepResult(1, (7, -1))
    assert decode_reply(encode_reply(1, LinkError(1, "boom")), LIMITS, batch()) == LinkError(1, "boom")
    assert decode_reply(encode_reply(1, LinkError(1, "x" * 10_000)), LIMITS, batch()).message == "x" * 4096  # type: ignore[union-attr]


def test_a_step_without_tokens_carries_an_empty_tensor_of_any_dtype() -> None:
    release = StepBatch(5, (), (("a", 1),))
    for empty in (torch.empty(0), torch.empty(0, 16, dtype=torch.bfloat16)):
        step, out = decode_request(encode_request(release, empty), LIMITS, MIDDLE)
        assert step == release and out is not None and out.shape == empty.shape


def test_link_frames_round_trip() -> None:
    hidden = torch.randn(4, 16)
    message, tensor = decode_link_frame(encode_link_frame(batch(), hidden), LIMITS)
    assert message == batch() and tensor is not None and torch.equal(tensor, hidden)
    assert decode_link_frame(encode_link_frame(StepResult(1, (5, -1))), LIMITS, batch=batch()) == (
        StepResult(1, (5, -1)),
        None,
    )
    assert decode_link_frame(encode_link_frame(LinkError(9, "no")), LIMITS) == (LinkError(9, "no"), None)


def _request(change) -> bytes:  # type: ignore[no-untyped-def]
    msg = request_to_proto(batch(), torch.randn(4, 16))
    change(msg)
    return msg.SerializeToString()


BAD = {
    "schema version": _request(lambda m: setattr(m, "schema_version", SCHEMA_VERSION + 1)),
    "chunks in one step": _request(lambda m: [m.chunks.add().CopyFrom(m.chunks[0]) for _ in range(3)]),
    "released slots": _request(lambda m: [m.released.add(seq_id="x", slot=0) for _ in range(257)]),
    "share a slot": _request(lambda m: setattr(m.chunks[1], "slot", 0)),
    "slot 4 outside": _request(lambda m: setattr(m.chunks[1], "slot", 4)),
    "slot -1 outside": _request(lambda m: setattr(m.released[0], "slot", -1)),
    "past 64": _request(lambda m: setattr(m.chunks[0], "start_pos", 62)),
    "positions -1": _request(lambda m: setattr(m.chunks[0], "start_pos", -1)),
    "input token ids": _request(lambda m: m.chunks[0].token_ids.append(100)),
    "a chunk without tokens": _request(lambda m: m.chunks[0].ClearField("token_ids")),
    "a step of 36 tokens": _request(lambda m: m.chunks[0].token_ids.extend([1] * 32)),
    "sequence id": _request(lambda m: setattr(m.chunks[0], "seq_id", "")),
    "temperature": _request(lambda m: setattr(m.chunks[0].sampling, "temperature", -1.0)),
    "top_p": _request(lambda m: setattr(m.chunks[0].sampling, "top_p", 0.0)),
    "negative top_k": _request(lambda m: setattr(m.chunks[0].sampling, "top_k", -1)),
    "seed": _request(lambda m: setattr(m.chunks[0].sampling, "seed", -5)),
    "stop token ids": _request(lambda m: m.chunks[0].sampling.stop_token_ids.append(100)),
    "dtype 'int8'": _request(lambda m: setattr(m.hidden, "dtype", "int8")),
    "dtype 'bfloat16'": _request(lambda m: setattr(m.hidden, "dtype", "bfloat16")),
    "shape [4]": _request(lambda m: (m.hidden.ClearField("shape"), m.hidden.shape.append(4))),
    "shape [5, 16]": _request(
        lambda m: setattr(m.hidden, "shape", [5, 16]) if False else m.hidden.shape.__setitem__(0, 5)
    ),
    "width 8": _request(lambda m: m.hidden.shape.__setitem__(1, 8)),
    "bytes, expected": _request(lambda m: setattr(m.hidden, "data", m.hidden.data + b"\0")),
    "no hidden states": _request(lambda m: m.ClearField("hidden")),
    "not a StepRequest": b"\x0a\xff\xff\xff\xff\x0f",
}


@pytest.mark.parametrize("reason", list(BAD))
def test_a_request_outside_the_limits_is_refused(reason: str) -> None:
    with pytest.raises(WireError, match=reason.split(" ", 1)[0] if reason.startswith("shape") else reason):
        decode_request(BAD[reason], LIMITS, MIDDLE)


def test_hidden_states_sent_to_the_first_stage_and_steps_out_of_order_are_refused() -> None:
    data = encode_request(batch(3), torch.randn(4, 16))
    with pytest.raises(WireError, match="first stage"):
        decode_request(data, LIMITS, Expect(first=True))
    with pytest.raises(WireError, match="increasing"):
        decode_request(data, LIMITS, MIDDLE, after_step_id=3)
    assert decode_request(data, LIMITS, MIDDLE, after_step_id=2)[0].step_id == 3


@pytest.mark.parametrize(
    ("reply", "expect", "reason"),
    [
        (encode_reply(2, StepResult(2, (1, -1))), Expect(), "step 2 where step 1"),
        (encode_reply(1, StepResult(1, (1,))), Expect(), "1 sampled tokens for 2 chunks"),
        (encode_reply(1, StepResult(1, (100, -1))), Expect(), "outside"),
        (encode_reply(1, StepResult(1, (1, 5))), Expect(), "does not sample"),
        (encode_reply(1, StepResult(1, (1, -1))), Expect(last=False), "is not the last"),
        (encode_reply(1, torch.randn(4, 16)), Expect(last=True), "is the last"),
        (encode_reply(1, torch.randn(4, 16).half()), MIDDLE, "dtype"),
        (encode_reply(1, torch.randn(3, 16)), MIDDLE, "shape"),
        (pb.StepReply(schema_version=SCHEMA_VERSION, step_id=1).SerializeToString(), Expect(), "nothing"),
        (pb.StepReply(schema_version=1, step_id=1, error="e" * 5000).SerializeToString(), Expect(), "error message"),
    ],
)
def test_a_reply_that_does_not_answer_its_step_is_refused(reply: bytes, expect: Expect, reason: str) -> None:
    with pytest.raises(WireError, match=reason):
        decode_reply(reply, LIMITS, batch(1), expect)


def test_a_frame_longer_than_the_limit_is_refused_before_it_is_read() -> None:
    left, right = socket.socketpair()
    with left, right:
        right.settimeout(2)  # read_message would block here if it tried to read the announced body
        left.sendall(struct.pack("!I", 1 << 31))
        with pytest.raises(WireError, match="at most 1000"):
            read_message(right, 1000)
        write_message(left, b"x" * 70_000)  # a large frame goes out in two writes
        assert read_message(right, 100_000) == b"x" * 70_000
        left.close()
        with pytest.raises(ConnectionError):
            read_message(right, 100)

    async def main() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(struct.pack("!I", 5000) + b"ab")
        with pytest.raises(WireError):
            await read_message_async(reader, 100)

    asyncio.run(main())


def test_for_model_reads_the_models_shape(tiny_dir: Path) -> None:
    limits = FrameLimits.for_model(tiny_dir, 8, None, max_batch_size=16, prefill_chunk=64)
    assert (limits.hidden_size, limits.vocab_size, limits.max_len, limits.num_layers) == (64, 512, 512, 6)
    assert (limits.max_step_tokens, limits.max_chunks) == (80, 8)
    assert limits.max_frame_bytes >= 80 * 64 * 4


def test_weights_digests_differ_per_stage_and_are_stable(tiny_dir: Path) -> None:
    specs = split_layers(6, 3)
    digests = [weights_digest(tiny_dir, spec) for spec in specs]
    assert len(set(digests)) == 3 and digests == [weights_digest(tiny_dir, spec) for spec in specs]


# -- fuzzing ---------------------------------------------------------------------------------------------

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
VALID = encode_request(batch(), torch.randn(4, 16))


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes_decode_to_nothing_but_wire_errors(data: bytes) -> None:
    for decode in (
        lambda: decode_request(data, LIMITS, MIDDLE),
        lambda: decode_request(data, LIMITS, Expect()),
        lambda: decode_reply(data, LIMITS, batch(), MIDDLE),
        lambda: decode_reply(data, LIMITS, None),
        lambda: decode_link_frame(data, LIMITS),
    ):
        with contextlib.suppress(WireError):
            decode()


@FUZZ
@given(st.integers(0, len(VALID) - 1), st.binary(min_size=1, max_size=8), st.booleans())
def test_a_corrupted_valid_step_is_either_valid_or_refused(position: int, patch: bytes, insert: bool) -> None:
    data = VALID[:position] + patch + VALID[position + (0 if insert else len(patch)) :]
    try:
        step, hidden = decode_request(data, LIMITS, MIDDLE)
    except WireError:
        return
    assert_within(step, hidden)


def assert_within(step: StepBatch, hidden: torch.Tensor | None) -> None:
    """What a decoded step guarantees the stage."""
    assert len(step.chunks) <= LIMITS.max_chunks and step.num_tokens <= LIMITS.max_step_tokens
    for chunk in step.chunks:
        assert 0 <= chunk.slot < LIMITS.kv_slots and chunk.start_pos >= 0
        assert chunk.start_pos + len(chunk.token_ids) <= LIMITS.max_len
        assert all(0 <= t < 100 for t in chunk.token_ids)
    assert hidden is not None and hidden.dtype == torch.float32
    assert tuple(hidden.shape) in ((step.num_tokens, 16), (0,)) or step.num_tokens == 0


ints = st.integers(-(2**31), 2**31 - 1)
tensors = st.builds(
    pb.Tensor,
    dtype=st.sampled_from(["float32", "bfloat16", "float16", "int64", ""]),
    shape=st.lists(st.integers(-4, 40), max_size=3),
    data=st.binary(max_size=400),
)
chunks = st.builds(
    pb.Chunk,
    seq_id=st.text(max_size=8),
    slot=st.integers(-2, 6),
    start_pos=st.integers(-2, 70),
    token_ids=st.lists(st.integers(-2, 102), max_size=6),
    sample=st.booleans(),
    sampling=st.builds(
        pb.Sampling,
        temperature=st.floats(allow_nan=True),
        top_p=st.floats(allow_nan=True),
        top_k=ints,
        stop_token_ids=st.lists(ints, max_size=3),
        max_tokens=ints,
    ),
)


@FUZZ
@given(
    st.builds(
        pb.StepRequest,
        schema_version=st.sampled_from([SCHEMA_VERSION, 0, 2]),
        step_id=st.integers(0, 2**64 - 1),
        chunks=st.lists(chunks, max_size=5),
        released=st.lists(st.builds(pb.Released, seq_id=st.text(max_size=4), slot=st.integers(-1, 5)), max_size=3),
        hidden=tensors,
    )
)
@example(pb.StepRequest(schema_version=SCHEMA_VERSION, hidden=pb.Tensor(dtype="bfloat16", shape=[0])))  # found by it
def test_any_structured_step_is_either_within_the_limits_or_refused(msg: pb.StepRequest) -> None:
    try:
        step, hidden = decode_request(msg.SerializeToString(), LIMITS, MIDDLE)
    except WireError:
        return
    assert_within(step, hidden)


SCORED = SamplingParams(
    temperature=0.0, presence_penalty=0.5, frequency_penalty=-1.5, logit_bias=((2, 10.0), (50, -100.0)), logprobs=2
)


def scored_batch() -> StepBatch:
    return StepBatch(1, (SeqChunk("a", 0, 0, (1, 2, 3), SCORED, output_start=2), SeqChunk("b", 1, 5, (7,), SAMPLED)))


def test_penalties_bias_logprobs_and_output_start_round_trip() -> None:
    step, _ = decode_request(encode_request(scored_batch(), None), LIMITS, Expect(first=True))
    assert step == scored_batch()
    result = StepResult(1, (4, 9), (TokenLogprobs(-0.25, ((4, -0.25), (8, -2.0))), None))
    assert decode_reply(encode_reply(1, result), LIMITS, scored_batch()) == result


@pytest.mark.parametrize(
    ("sampling", "message"),
    [
        (SamplingParams(presence_penalty=2.5), "presence_penalty"),
        (SamplingParams(logit_bias=((100, 1.0),)), "logit bias token ids"),
        (SamplingParams(logit_bias=((5, 1.0), (2, 1.0))), "ascend"),
        (SamplingParams(logit_bias=((5, 101.0),)), "logit bias value"),
        (SamplingParams(logprobs=21), "logprobs 21"),
    ],
)
def test_bad_sampling_fields_are_refused(sampling: SamplingParams, message: str) -> None:
    bad = StepBatch(1, (SeqChunk("a", 0, 0, (1,), sampling),))
    with pytest.raises(WireError, match=message):
        decode_request(encode_request(bad, None), LIMITS, Expect(first=True))


@pytest.mark.parametrize(
    ("result", "message"),
    [
        (StepResult(1, (4, 9)), "no logprobs for a step"),
        (StepResult(1, (4, 9), (TokenLogprobs(-0.1, ((1, -0.1),) * 3), None)), "did not ask"),
        (StepResult(1, (4, 9), (TokenLogprobs(0.5), None)), "finite number <= 0"),
        (StepResult(1, (4, 9), (TokenLogprobs(-0.1), TokenLogprobs(-0.1))), "did not ask"),
        (StepResult(1, (4, 9), (TokenLogprobs(-0.1, ((100, -1.0),)), None)), "top logprob token ids"),
    ],
)
def test_a_last_stage_cannot_send_logprobs_out_of_bounds(result: StepResult, message: str) -> None:
    with pytest.raises(WireError, match=message):
        decode_reply(encode_reply(1, result), LIMITS, scored_batch())
