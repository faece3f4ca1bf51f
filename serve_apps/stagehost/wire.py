"""The stage protocol's codec: engine messages <-> protobuf (stage.proto), validated strictly on decode.

One codec for both transports that cross process boundaries without Ray: a provider's gRPC stage host
(server.py / client.py) and the operator's direct stage-to-stage TCP links (serve_apps.engine.links,
length-prefixed `LinkFrame`s, see `write_message` / `read_message`). Nothing is ever unpickled: a peer can
only send ids, token ids, positions, sampling parameters and raw tensor bytes, and every field is checked
against `FrameLimits` (the receiving stage's own configuration) before anything is computed. Any violation
raises `WireError`; protobuf's own parse errors are translated to it.

Tensors travel as row-major little-endian bytes (this code assumes a little-endian host, as torch's own
serialization does on x86 and ARM).
"""

import asyncio
import dataclasses
import functools
import itertools
import math
import socket
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from google.protobuf.message import DecodeError

from serve_apps.engine.layer_split import StageSpec
from serve_apps.engine.messages import SamplingParams, SeqChunk, StepBatch, StepResult, TokenLogprobs
from serve_apps.stagehost import stage_pb2 as pb

SCHEMA_VERSION = 1
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FRAME_HEADER = struct.Struct("!I")  # length of the serialized message that follows
MAX_TEMPERATURE = 1000.0
MAX_SEED = 2**63 - 1
MAX_ERROR_BYTES = 4096  # an error message is cut to this when sent
_FRAME_OVERHEAD = 1 << 16  # bytes of a step's fixed fields and tags, generously
_CHUNK_OVERHEAD = 128  # bytes per chunk besides its seq_id and token ids (sampling, tags, varints)
MAX_LOGIT_BIAS = 300  # entries of one request's logit_bias (OpenAI's bound)
MAX_TOP_LOGPROBS = 20  # most likely tokens reported per sampled token (OpenAI's bound)
MAX_PENALTY = 2.0
MAX_BIAS = 100.0
_ENTRY_BYTES = 16  # one (token id, float64) entry of a bias or a logprobs list, with its tags, at most

if sys.byteorder != "little":  # pragma: no cover - every platform the project runs on is little-endian
    raise ImportError("the stage protocol's tensor encoding assumes a little-endian host")


class WireError(ValueError):
    """A message that does not parse, or breaks the receiving stage's limits (nothing of it was used)."""


@dataclass(frozen=True, slots=True)
class LinkError:
    """A stage could not compute a step; passed back (down the chain, or as a reply) instead of a result."""

    step_id: int
    message: str


@dataclass(frozen=True, slots=True)
class FrameLimits:
    """What a stage accepts: its model's shape, its KV cache, and the largest step its coordinator sends.

    `hidden_size` / `vocab_size` None means "not known here" (only an operator-internal link whose stage
    did not pass its config); the shape is then checked for consistency with the step, not the model.
    """

    hidden_size: int | None
    vocab_size: int | None
    kv_slots: int
    max_len: int
    max_step_tokens: int
    max_chunks: int
    # 0: 64 x kv_slots. Released pairs accumulate while steps fail (they are requeued) and a refused step
    # would be replayed with even more, so the bound is generous: it only caps a frame's size.
    max_released: int = 0
    num_layers: int = 0  # the model's decoder layers (0: not known)
    dtypes: frozenset[str] = field(default_factory=lambda: frozenset(DTYPES))
    max_seq_id_bytes: int = 256
    max_stop_token_ids: int = 64
    max_error_bytes: int = MAX_ERROR_BYTES
    max_hidden_size: int = 65_536  # bounds the width when hidden_size is None
    max_mask_bytes: int = 4 * ((1 << 20) // 32)  # a token mask's size when vocab_size is None (1 Mi tokens)
    frame_cap_bytes: int = 1 << 30  # no frame larger than this, whatever the other limits allow
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if min(self.kv_slots, self.max_len, self.max_step_tokens, self.max_chunks) < 1:
            raise ValueError(f"invalid frame limits: {self}")
        if not self.dtypes <= set(DTYPES):
            raise ValueError(f"unsupported dtypes {sorted(self.dtypes - set(DTYPES))}")

    @property
    def released_limit(self) -> int:
        return self.max_released or 64 * self.kv_slots

    @property
    def max_frame_bytes(self) -> int:
        """Upper bound of one serialized step or reply within these limits (what a reader may allocate)."""
        width = self.hidden_size or self.max_hidden_size
        hidden = (self.max_step_tokens + self.max_chunks) * width * 4  # the step's states, or its embeddings
        per_chunk = (
            self.max_stop_token_ids * 6 + _CHUNK_OVERHEAD + (MAX_LOGIT_BIAS + MAX_TOP_LOGPROBS + 1) * _ENTRY_BYTES
        )
        tokens = self.max_step_tokens * 6 + self.max_chunks * per_chunk
        ids = (self.max_chunks + self.released_limit) * (self.max_seq_id_bytes + 16)
        vocab = self.vocab_size
        masks = self.max_chunks * ((4 * ((vocab + 31) // 32) if vocab is not None else self.max_mask_bytes) + 8)
        return min(hidden + tokens + ids + masks + self.max_error_bytes + _FRAME_OVERHEAD, self.frame_cap_bytes)

    @classmethod
    def for_model(
        cls, model_dir: Path | str, kv_slots: int, max_len: int | None, max_batch_size: int, prefill_chunk: int = 512
    ) -> "FrameLimits":
        """Limits of a pipeline over `model_dir`: steps of up to `max_batch_size` decode rows plus
        `prefill_chunk` prompt tokens (the scheduler's budget), one chunk per KV slot at most."""
        from serve_apps.engine.stage_model import load_config

        config = load_config(Path(model_dir))
        context = int(max_len or config.max_position_embeddings)
        return cls(
            hidden_size=int(config.hidden_size),
            vocab_size=int(config.vocab_size),
            kv_slots=kv_slots,
            max_len=context,
            max_step_tokens=max_batch_size + prefill_chunk,
            max_chunks=kv_slots,
            num_layers=int(config.num_hidden_layers),
        )

    @classmethod
    def for_stage(cls, config: object, max_step_tokens: int | None = None) -> "FrameLimits":
        """Limits of one stage from its own `StageConfig`: its model, KV slots and context length. Without
        `max_step_tokens`, any step that fits the cache (kv_slots x max_len tokens)."""
        from serve_apps.engine.stage_worker import StageConfig

        if not isinstance(config, StageConfig):
            raise TypeError(f"expected a StageConfig, got {type(config).__name__}")
        limits = cls.for_model(config.model_dir, config.kv_slots, config.max_len, 1)
        tokens = max_step_tokens or config.kv_slots * config.max_len
        return limits.replace(max_step_tokens=tokens, dtypes=frozenset({config.dtype}))

    def replace(self, **changes: object) -> "FrameLimits":
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Expect:
    """What the receiver knows about the stage a message is for (None: not known, not checked)."""

    first: bool | None = None  # the stage takes token ids, so a request carries no hidden states
    last: bool | None = None  # the stage samples, so its reply is tokens
    dtype: str | None = None  # the hidden states' dtype


UNKNOWN = Expect()


# -- tensors ------------------------------------------------------------------------------------------


def tensor_to_proto(tensor: torch.Tensor) -> pb.Tensor:
    name = str(tensor.dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise WireError(f"dtype {name} is not sent over the stage protocol")
    return pb.Tensor(dtype=name, shape=list(tensor.shape), data=tensor_bytes(tensor))


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    if tensor.numel() == 0:
        return b""
    flat = tensor.detach().cpu().contiguous().view(-1).view(torch.uint8)
    return flat.numpy().tobytes()


def tensor_from_proto(msg: pb.Tensor, limits: FrameLimits, num_tokens: int, dtype: str | None) -> torch.Tensor:
    """The hidden states of a step of `num_tokens` tokens: [num_tokens, hidden] exactly, bytes to match.

    A step without tokens (it only releases slots) carries an empty tensor of shape [0] or [0, hidden].
    """
    if msg.dtype not in DTYPES:
        raise WireError(f"hidden states of dtype {msg.dtype!r}, not one of {sorted(DTYPES)}")
    shape = tuple(msg.shape)
    width = limits.hidden_size
    if num_tokens == 0 and (shape == (0,) or (len(shape) == 2 and shape[0] == 0)):
        if len(shape) == 2 and (shape[1] != width if width is not None else not 0 < shape[1] <= limits.max_hidden_size):
            raise WireError(f"an empty tensor of shape {list(shape)}")
        if msg.data:
            raise WireError("an empty tensor with data")
        # A stage returns an empty float32 tensor for a step without tokens whatever its dtype, so any dtype is
        # accepted here; what the stage receives is in the dtype it expects, as every other decoded tensor is.
        return torch.empty(shape, dtype=DTYPES[dtype if dtype in DTYPES else msg.dtype])
    if msg.dtype not in limits.dtypes or (dtype is not None and msg.dtype != dtype):
        raise WireError(f"hidden states of dtype {msg.dtype!r}, expected {dtype or sorted(limits.dtypes)}")
    if len(shape) != 2 or shape[0] != num_tokens:
        raise WireError(f"hidden states of shape {list(shape)} for a step of {num_tokens} tokens")
    if (width is not None and shape[1] != width) or not 1 <= shape[1] <= limits.max_hidden_size:
        raise WireError(f"hidden states of width {shape[1]}, expected {width or f'<= {limits.max_hidden_size}'}")
    dt = DTYPES[msg.dtype]
    expected = num_tokens * shape[1] * dt.itemsize
    if len(msg.data) != expected:
        raise WireError(f"hidden states of {len(msg.data)} bytes, expected {expected} for {list(shape)} {msg.dtype}")
    # A writable copy: the stage's layers may compute in place, and protobuf's bytes are immutable.
    return torch.frombuffer(bytearray(msg.data), dtype=torch.uint8).view(dt).view(shape)


# -- steps ----------------------------------------------------------------------------------------------


def request_to_proto(batch: StepBatch, hidden: torch.Tensor | None) -> pb.StepRequest:
    try:
        msg = pb.StepRequest(
            schema_version=SCHEMA_VERSION,
            step_id=batch.step_id,
            chunks=[_chunk_to_proto(c) for c in batch.chunks],
            released=[pb.Released(seq_id=s, slot=slot) for s, slot in batch.released_slots],
        )
    except (ValueError, TypeError) as exc:  # a field out of its protobuf range (our own bug, not a peer's)
        raise WireError(f"step {batch.step_id} cannot be encoded: {exc}") from exc
    if hidden is not None:
        msg.hidden.CopyFrom(tensor_to_proto(hidden))
    return msg


def _chunk_to_proto(chunk: SeqChunk) -> pb.Chunk:
    msg = pb.Chunk(
        seq_id=chunk.seq_id,
        slot=chunk.slot,
        start_pos=chunk.start_pos,
        token_ids=chunk.token_ids,
        sample=chunk.sample,
        output_start=chunk.output_start,
    )
    msg.sampling.MergeFromString(_sampling_bytes(chunk.sampling))
    if chunk.token_mask is not None:
        msg.token_mask = chunk.token_mask
    return msg


@functools.lru_cache(maxsize=1024)
def _sampling_bytes(s: SamplingParams) -> bytes:
    """A request's sampling, serialized once: every chunk of it in every step sends the same bytes."""
    sampling = pb.Sampling(
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        stop_token_ids=s.stop_token_ids,
        ignore_eos=s.ignore_eos,
        max_tokens=s.max_tokens,
        presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty,
        bias_token_ids=[t for t, _ in s.logit_bias],
        bias_values=[b for _, b in s.logit_bias],
        embed=s.embed,
    )
    if s.seed is not None:
        sampling.seed = s.seed
    if s.logprobs is not None:
        sampling.logprobs = s.logprobs
    return sampling.SerializeToString()


def encode_request(batch: StepBatch, hidden: torch.Tensor | None) -> bytes:
    return request_to_proto(batch, hidden).SerializeToString()


def decode_request(
    data: bytes, limits: FrameLimits, expect: Expect = UNKNOWN, after_step_id: int | None = None
) -> tuple[StepBatch, torch.Tensor | None]:
    """Parse and validate a serialized StepRequest; `after_step_id`: step ids must increase past it."""
    return request_from_proto(_parse(pb.StepRequest, data, limits), limits, expect, after_step_id)


def request_from_proto(
    msg: pb.StepRequest, limits: FrameLimits, expect: Expect = UNKNOWN, after_step_id: int | None = None
) -> tuple[StepBatch, torch.Tensor | None]:
    _check_version(msg.schema_version, limits)
    if after_step_id is not None and msg.step_id <= after_step_id:
        raise WireError(f"step {msg.step_id} after step {after_step_id}: steps must come in increasing order")
    if len(msg.chunks) > limits.max_chunks:
        raise WireError(f"{len(msg.chunks)} chunks in one step, at most {limits.max_chunks}")
    if len(msg.released) > limits.released_limit:
        raise WireError(f"{len(msg.released)} released slots in one step, at most {limits.released_limit}")
    chunks = tuple(_chunk_from_proto(c, limits) for c in msg.chunks)
    num_tokens = sum(len(c.token_ids) for c in chunks)
    if num_tokens > limits.max_step_tokens:
        raise WireError(f"a step of {num_tokens} tokens, at most {limits.max_step_tokens}")
    if len({c.slot for c in chunks}) != len(chunks) or len({c.seq_id for c in chunks}) != len(chunks):
        raise WireError("two chunks of one step share a slot or a sequence")
    released = tuple((_seq_id(r.seq_id, limits), _slot(r.slot, limits)) for r in msg.released)
    hidden = None
    if msg.HasField("hidden"):
        if expect.first:
            raise WireError("hidden states sent to the first stage")
        hidden = tensor_from_proto(msg.hidden, limits, num_tokens, expect.dtype)
    elif expect.first is False:
        raise WireError(f"step {msg.step_id} carries no hidden states for a stage after the first")
    return StepBatch(msg.step_id, chunks, released), hidden


def _chunk_from_proto(msg: pb.Chunk, limits: FrameLimits) -> SeqChunk:
    tokens = tuple(msg.token_ids)
    if not tokens:
        raise WireError("a chunk without tokens")
    if msg.start_pos < 0 or msg.start_pos + len(tokens) > limits.max_len:
        raise WireError(f"a chunk at positions {msg.start_pos}..{msg.start_pos + len(tokens)} past {limits.max_len}")
    _check_tokens(tokens, limits, "input")
    if not 0 <= msg.output_start <= limits.max_len:
        raise WireError(f"output_start {msg.output_start} outside [0, {limits.max_len}]")
    return SeqChunk(
        _seq_id(msg.seq_id, limits),
        _slot(msg.slot, limits),
        msg.start_pos,
        tokens,
        _sampling_cached(msg.sampling.SerializeToString(), limits.vocab_size, limits.max_stop_token_ids),
        msg.sample,
        _token_mask(msg, limits),
        msg.output_start,
    )


def _token_mask(msg: pb.Chunk, limits: FrameLimits) -> bytes | None:
    """A sampling chunk's mask: exactly a word per 32 tokens of the vocabulary (or, vocabulary unknown, at
    most `max_mask_bytes`), allowing at least one token."""
    if not msg.token_mask:
        return None
    size = len(msg.token_mask)
    if not msg.sample:
        raise WireError("a token mask on a chunk that does not sample")
    if limits.vocab_size is not None and size != 4 * ((limits.vocab_size + 31) // 32):
        raise WireError(f"a token mask of {size} bytes for a vocabulary of {limits.vocab_size}")
    if size % 4 or size > limits.max_mask_bytes:
        raise WireError(f"a token mask of {size} bytes (whole int32 words, at most {limits.max_mask_bytes})")
    if not any(msg.token_mask):
        raise WireError("a token mask that allows no token")
    return bytes(msg.token_mask)


@functools.lru_cache(maxsize=1024)
def _sampling_cached(raw: bytes, vocab_size: int | None, max_stop_token_ids: int) -> SamplingParams:
    """Parse and check a chunk's sampling once per distinct value (a request sends the same one every step;
    a WireError is not cached). `raw` is protobuf's own re-serialization, so equal values are equal keys."""
    limits = FrameLimits(vocab_size, vocab_size, 1, 1, 1, 1, max_stop_token_ids=max_stop_token_ids)
    return _sampling_from_proto(pb.Sampling.FromString(raw), limits)


def _sampling_from_proto(msg: pb.Sampling, limits: FrameLimits) -> SamplingParams:
    if not (math.isfinite(msg.temperature) and 0.0 <= msg.temperature <= MAX_TEMPERATURE):
        raise WireError(f"temperature {msg.temperature} outside [0, {MAX_TEMPERATURE}]")
    if not (math.isfinite(msg.top_p) and 0.0 < msg.top_p <= 1.0):
        raise WireError(f"top_p {msg.top_p} outside (0, 1]")
    if msg.top_k < 0 or msg.max_tokens < 0:
        raise WireError("negative top_k or max_tokens")
    if msg.HasField("seed") and not 0 <= msg.seed <= MAX_SEED:
        raise WireError(f"seed {msg.seed} outside [0, 2**63)")
    stop = tuple(msg.stop_token_ids)
    if len(stop) > limits.max_stop_token_ids:
        raise WireError(f"{len(stop)} stop token ids, at most {limits.max_stop_token_ids}")
    _check_tokens(stop, limits, "stop")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(msg, name)
        if not (math.isfinite(value) and -MAX_PENALTY <= value <= MAX_PENALTY):
            raise WireError(f"{name} {value} outside [-{MAX_PENALTY}, {MAX_PENALTY}]")
    bias_ids, bias_values = tuple(msg.bias_token_ids), tuple(msg.bias_values)
    if len(bias_ids) != len(bias_values) or len(bias_ids) > MAX_LOGIT_BIAS:
        raise WireError(f"a logit bias of {len(bias_ids)} ids and {len(bias_values)} values (at most {MAX_LOGIT_BIAS})")
    if any(b <= a for a, b in zip(bias_ids, bias_ids[1:], strict=False)):
        raise WireError("logit bias token ids must ascend")
    _check_tokens(bias_ids, limits, "logit bias")
    if not all(math.isfinite(v) and -MAX_BIAS <= v <= MAX_BIAS for v in bias_values):
        raise WireError(f"a logit bias value outside [-{MAX_BIAS}, {MAX_BIAS}]")
    if msg.HasField("logprobs") and not 0 <= msg.logprobs <= MAX_TOP_LOGPROBS:
        raise WireError(f"logprobs {msg.logprobs} outside [0, {MAX_TOP_LOGPROBS}]")
    return SamplingParams(
        max_tokens=msg.max_tokens,
        temperature=msg.temperature,
        top_p=msg.top_p,
        top_k=msg.top_k,
        seed=msg.seed if msg.HasField("seed") else None,
        stop_token_ids=stop,
        ignore_eos=msg.ignore_eos,
        presence_penalty=msg.presence_penalty,
        frequency_penalty=msg.frequency_penalty,
        logit_bias=tuple(zip(bias_ids, bias_values, strict=True)),
        logprobs=msg.logprobs if msg.HasField("logprobs") else None,
        embed=msg.embed,
    )


def _check_tokens(tokens: Sequence[int], limits: FrameLimits, what: str) -> None:
    if tokens and (min(tokens) < 0 or (limits.vocab_size is not None and max(tokens) >= limits.vocab_size)):
        raise WireError(f"{what} token ids outside [0, {limits.vocab_size})")


def _seq_id(seq_id: str, limits: FrameLimits) -> str:
    if not seq_id or len(seq_id.encode()) > limits.max_seq_id_bytes:
        raise WireError(f"a sequence id of {len(seq_id.encode())} bytes (1..{limits.max_seq_id_bytes})")
    return seq_id


def _slot(slot: int, limits: FrameLimits) -> int:
    if not 0 <= slot < limits.kv_slots:
        raise WireError(f"slot {slot} outside [0, {limits.kv_slots})")
    return slot


# -- replies --------------------------------------------------------------------------------------------


def reply_to_proto(step_id: int, out: torch.Tensor | StepResult | LinkError) -> pb.StepReply:
    msg = pb.StepReply(schema_version=SCHEMA_VERSION, step_id=step_id)
    if isinstance(out, StepResult):
        msg.tokens.token_ids.extend(out.token_ids)
        for scored in out.logprobs:
            entry = msg.tokens.logprobs.add()
            if scored is not None:
                entry.present, entry.logprob = True, scored.logprob
                entry.top_ids.extend(t for t, _ in scored.top)
                entry.top_logprobs.extend(v for _, v in scored.top)
        rows = [(i, vector) for i, vector in enumerate(out.pooled) if vector is not None]
        if rows:
            msg.tokens.pooled_index.extend(i for i, _ in rows)
            msg.tokens.pooled.CopyFrom(tensor_to_proto(torch.tensor([v for _, v in rows], dtype=torch.float32)))
    elif isinstance(out, LinkError):
        msg.error = out.message.encode()[:MAX_ERROR_BYTES].decode(errors="ignore")
    else:
        msg.hidden.CopyFrom(tensor_to_proto(out))
    return msg


def encode_reply(step_id: int, out: torch.Tensor | StepResult | LinkError) -> bytes:
    return reply_to_proto(step_id, out).SerializeToString()


def decode_reply(
    data: bytes, limits: FrameLimits, batch: StepBatch | None, expect: Expect = UNKNOWN
) -> torch.Tensor | StepResult | LinkError:
    """Parse and validate a serialized StepReply to `batch` (None: only bounds are checked)."""
    return reply_from_proto(_parse(pb.StepReply, data, limits), limits, batch, expect)


def reply_from_proto(
    msg: pb.StepReply, limits: FrameLimits, batch: StepBatch | None, expect: Expect = UNKNOWN
) -> torch.Tensor | StepResult | LinkError:
    _check_version(msg.schema_version, limits)
    if batch is not None and msg.step_id != batch.step_id:
        raise WireError(f"a reply to step {msg.step_id} where step {batch.step_id} was next")
    kind = msg.WhichOneof("result")
    if kind == "error":
        if len(msg.error.encode()) > limits.max_error_bytes:
            raise WireError(f"an error message over {limits.max_error_bytes} bytes")
        return LinkError(msg.step_id, msg.error)
    if kind is None or (expect.last is not None and expect.last != (kind == "tokens")):
        raise WireError(f"a reply of {kind or 'nothing'} from a stage that is {'' if expect.last else 'not '}the last")
    if kind == "tokens":
        tokens = _sampled(tuple(msg.tokens.token_ids), limits, batch)
        logprobs = _logprobs_from_proto(msg.tokens.logprobs, tokens, limits, batch)
        result = StepResult(msg.step_id, tokens, logprobs, _pooled(msg.tokens, limits, len(tokens)))
        if batch is not None:
            _check_pooled(result, batch)
        return result
    num_tokens = batch.num_tokens if batch is not None else msg.hidden.shape[0] if msg.hidden.shape else 0
    if num_tokens > limits.max_step_tokens:
        raise WireError(f"a reply of {num_tokens} rows, at most {limits.max_step_tokens}")
    return tensor_from_proto(msg.hidden, limits, num_tokens, expect.dtype)


def check_result(result: StepResult, batch: StepBatch, limits: FrameLimits) -> None:
    """WireError unless `result` answers `batch`: its step id, a token per chunk as `_sampled` checks."""
    if result.step_id != batch.step_id:
        raise WireError(f"a result for step {result.step_id} where step {batch.step_id} was expected")
    _sampled(result.token_ids, limits, batch)
    if result.logprobs:
        _logprobs_from_proto(reply_to_proto(result.step_id, result).tokens.logprobs, result.token_ids, limits, batch)
    _check_pooled(result, batch)


def _logprobs_from_proto(
    entries: Sequence[pb.Logprobs], tokens: tuple[int, ...], limits: FrameLimits, batch: StepBatch | None
) -> tuple[TokenLogprobs | None, ...]:
    """One entry per chunk (or none): present exactly where the chunk sampled and asked for logprobs,
    with at most the asked number of alternatives, each a finite logprob <= 0 of a token in the vocabulary."""
    if not entries:
        if batch is not None and any(c.sample and c.sampling.logprobs is not None for c in batch.chunks):
            raise WireError("no logprobs for a step that asked for them")
        return ()
    if len(entries) != len(tokens):
        raise WireError(f"{len(entries)} logprobs entries for {len(tokens)} chunks")
    out: list[TokenLogprobs | None] = []
    for index, entry in enumerate(entries):
        asked = None if batch is None else batch.chunks[index].sampling.logprobs
        wanted = batch is None or (batch.chunks[index].sample and asked is not None)
        if not entry.present:
            if batch is not None and wanted:
                raise WireError(f"no logprobs for chunk {index}, which asked for them")
            out.append(None)
            continue
        top_ids, top_values = tuple(entry.top_ids), tuple(entry.top_logprobs)
        bound = MAX_TOP_LOGPROBS if asked is None else asked
        if not wanted or len(top_ids) != len(top_values) or len(top_ids) > bound:
            raise WireError(f"logprobs for chunk {index} that it did not ask for")
        values = (entry.logprob, *top_values)
        if not all(math.isfinite(v) and v <= 0.0 for v in values):
            raise WireError("a logprob that is not a finite number <= 0")
        _check_tokens(top_ids, limits, "top logprob")
        out.append(TokenLogprobs(entry.logprob, tuple(zip(top_ids, top_values, strict=True))))
    return tuple(out)


def _pooled(msg: pb.Tokens, limits: FrameLimits, num_chunks: int) -> tuple[tuple[float, ...] | None, ...]:
    """The embeddings of a reply, per chunk: rows of float32 at strictly increasing chunk indexes."""
    index = list(msg.pooled_index)
    if not index:
        if msg.HasField("pooled"):
            raise WireError("pooled embeddings without their chunk indexes")
        return ()
    if any(b <= a for a, b in itertools.pairwise(index)) or index[0] < 0 or index[-1] >= num_chunks:
        raise WireError(f"pooled chunk indexes {index[:8]} not increasing within {num_chunks} chunks")
    if not msg.HasField("pooled") or msg.pooled.dtype != "float32":
        raise WireError("pooled embeddings must be a float32 tensor")
    rows = tensor_from_proto(msg.pooled, limits, len(index), "float32")
    if not bool(torch.isfinite(rows).all()):
        raise WireError("pooled embeddings that are not finite")
    pooled: list[tuple[float, ...] | None] = [None] * num_chunks
    for i, row in zip(index, rows.tolist(), strict=True):
        pooled[i] = tuple(row)
    return tuple(pooled)


def _check_pooled(result: StepResult, batch: StepBatch) -> None:
    """An embedding exactly for each chunk that ends an embedding sequence's prompt."""
    given = result.pooled or (None,) * len(batch.chunks)
    for vector, chunk in zip(given, batch.chunks, strict=True):
        if (vector is not None) != (chunk.sample and chunk.sampling.embed):
            wrong = "no embedding where one was asked" if vector is None else "an embedding where none was asked"
            raise WireError(f"chunk {chunk.seq_id!r}: {wrong}")


def _sampled(tokens: tuple[int, ...], limits: FrameLimits, batch: StepBatch | None) -> tuple[int, ...]:
    """One token per chunk: in [0, vocab) where the chunk samples, -1 where it does not."""
    if batch is None:
        if len(tokens) > limits.max_chunks or (tokens and min(tokens) < -1):
            raise WireError("sampled tokens out of bounds")
        _check_tokens([t for t in tokens if t != -1], limits, "sampled")
        return tokens
    if len(tokens) != len(batch.chunks):
        raise WireError(f"{len(tokens)} sampled tokens for {len(batch.chunks)} chunks")
    for token, chunk in zip(tokens, batch.chunks, strict=True):
        if (not chunk.sample or chunk.sampling.embed) and token != -1:
            raise WireError(f"a token for chunk {chunk.seq_id!r}, which does not sample")
        in_vocab = token >= 0 and (limits.vocab_size is None or token < limits.vocab_size)
        if chunk.sample and not chunk.sampling.embed and not in_vocab:
            raise WireError(f"sampled token {token} outside [0, {limits.vocab_size})")
    return tokens


# -- direct links ---------------------------------------------------------------------------------------


def encode_link_frame(message: StepBatch | StepResult | LinkError, tensor: torch.Tensor | None = None) -> bytes:
    """What one hop of a direct link carries: a step (with the previous stage's output) or a reply."""
    if isinstance(message, StepBatch):
        return pb.LinkFrame(request=request_to_proto(message, tensor)).SerializeToString()
    return pb.LinkFrame(reply=reply_to_proto(message.step_id, message)).SerializeToString()


def decode_link_frame(
    data: bytes, limits: FrameLimits, expect: Expect = UNKNOWN, batch: StepBatch | None = None
) -> tuple[StepBatch | StepResult | LinkError, torch.Tensor | None]:
    """A link frame -> (step, hidden states) or (reply, None); replies are checked against `batch` if given."""
    frame = _parse(pb.LinkFrame, data, limits)
    body = frame.WhichOneof("body")
    if body == "request":
        return request_from_proto(frame.request, limits, expect)
    if body == "reply":
        out = reply_from_proto(frame.reply, limits, batch, Expect(last=True) if batch is not None else Expect())
        if isinstance(out, torch.Tensor):
            raise WireError("hidden states in a reply on a direct link (they travel with the step)")
        return out, None
    raise WireError("an empty link frame")


# -- framing --------------------------------------------------------------------------------------------


def frame_buffers(payload: bytes) -> list[bytes]:
    """The buffers of one length-prefixed frame (write them in one call)."""
    return [FRAME_HEADER.pack(len(payload)), payload]


def write_message(sock: socket.socket, payload: bytes, small: int = 1 << 16) -> None:
    """Send one frame; a small one in a single segment (a decode step's few KB), a large one without a copy."""
    header = FRAME_HEADER.pack(len(payload))
    if len(payload) <= small:
        sock.sendall(header + payload)
    else:
        sock.sendall(header)
        sock.sendall(payload)


def read_message(sock: socket.socket, max_bytes: int) -> bytes:
    """The next frame's payload; WireError when its length exceeds `max_bytes` (checked before allocating),
    ConnectionError when the peer closed the connection."""
    (size,) = FRAME_HEADER.unpack(_recv_exact(sock, FRAME_HEADER.size))
    _check_size(size, max_bytes)
    return bytes(_recv_exact(sock, size))


async def read_message_async(reader: asyncio.StreamReader, max_bytes: int) -> bytes:
    """`read_message` for asyncio streams (asyncio.IncompleteReadError at the end of the stream)."""
    (size,) = FRAME_HEADER.unpack(await reader.readexactly(FRAME_HEADER.size))
    _check_size(size, max_bytes)
    return await reader.readexactly(size) if size else b""


def write_message_async(writer: asyncio.StreamWriter, payload: bytes) -> None:
    """Queue one frame on `writer` (the caller drains)."""
    writer.writelines(frame_buffers(payload))


def _check_size(size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise WireError(f"a frame of {size} bytes, at most {max_bytes}")


def _recv_exact(sock: socket.socket, size: int) -> bytearray:
    buf = bytearray(size)
    view, got = memoryview(buf), 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("link closed by its peer")
        got += n
    return buf


def _parse(kind: type, data: bytes, limits: FrameLimits):  # type: ignore[no-untyped-def]
    if len(data) > limits.max_frame_bytes:
        raise WireError(f"a message of {len(data)} bytes, at most {limits.max_frame_bytes}")
    msg = kind()
    try:
        msg.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError, TypeError) as exc:
        raise WireError(f"not a {kind.__name__}: {exc}") from exc
    return msg


def _check_version(version: int, limits: FrameLimits) -> None:
    if version != limits.schema_version:
        raise WireError(f"schema version {version}, this stage speaks {limits.schema_version}")


# -- weights --------------------------------------------------------------------------------------------


def weights_digest(model_dir: Path | str, spec: StageSpec) -> str:
    """sha256 (hex) over exactly the checkpoint tensors a stage with `spec` loads (see stage_model.build_stage):
    for each tensor in name order its name, dtype, shape and bytes as stored. Equal digests: equal weights."""
    import hashlib

    from safetensors import safe_open

    from serve_apps.engine.stage_model import _tensor_files, load_config, stage_tensor_names

    model_dir = Path(model_dir)
    names = sorted(set(stage_tensor_names(spec, load_config(model_dir)).values()))
    files = _tensor_files(model_dir)
    digest = hashlib.sha256(b"solanalm-stage-weights-v1\0")
    handles: dict[Path, object] = {}
    for name in names:
        path = files.get(name)
        if path is None:
            raise KeyError(f"{model_dir}: checkpoint has no tensor {name!r}")
        handle = handles.setdefault(path, safe_open(str(path), framework="pt"))
        tensor = handle.get_tensor(name)  # type: ignore[attr-defined]
        header = f"{name}\0{str(tensor.dtype).removeprefix('torch.')}\0{list(tensor.shape)}\0"
        digest.update(header.encode())
        digest.update(tensor_bytes(tensor) if tensor.numel() else b"")
    return digest.hexdigest()
