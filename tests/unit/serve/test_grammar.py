"""Grammar-constrained decoding: xgrammar masks on SmolLM2's tokenizer, applied as the last stage applies them,
carried by the scheduler's chunks and the stage protocol; outputs valid by construction from random logits."""

import json
from pathlib import Path

import jsonschema
import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from cluster.models.materialize import tokenizer_dir
from serve_apps.engine.grammar import GrammarCompiler, GrammarError
from serve_apps.engine.messages import GrammarSpec, SamplingParams, SeqChunk, StepBatch, StepResult
from serve_apps.engine.scheduler import Scheduler, SchedulerLimits, Sequence
from serve_apps.engine.token_mask import allowed_tokens, apply_token_masks, mask_words
from serve_apps.stagehost.wire import FrameLimits, WireError, decode_request, encode_request, request_to_proto

VOCAB = 49152
EOS = 2
SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green", "blue"]}},
    "required": ["ok", "color"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tokenizer(model_cache_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(tokenizer_dir(model_cache_dir))


@pytest.fixture(scope="module")
def compiler(tokenizer: PreTrainedTokenizerBase) -> GrammarCompiler:
    return GrammarCompiler(tokenizer, VOCAB, (EOS,))


def test_a_valid_answer_is_allowed_token_by_token_then_only_eos(
    compiler: GrammarCompiler, tokenizer: PreTrainedTokenizerBase
) -> None:
    constraint = compiler.constraint(compiler.compile(GrammarSpec("json_schema", json.dumps(SCHEMA))))
    for token in tokenizer.encode('{"ok": true, "color": "green"}', add_special_tokens=False):
        mask = constraint.next_mask()
        assert len(mask) == 4 * mask_words(VOCAB)
        assert allowed_tokens(mask, VOCAB)[token]
        assert constraint.accept(token)
    final = allowed_tokens(constraint.next_mask(), VOCAB)
    assert final.nonzero().flatten().tolist() == [EOS]
    assert constraint.accept(EOS) and constraint.terminated


def test_a_token_outside_the_grammar_is_refused(compiler: GrammarCompiler, tokenizer: PreTrainedTokenizerBase) -> None:
    constraint = compiler.constraint(compiler.compile(GrammarSpec("json_object")))
    hello = tokenizer.encode("hello", add_special_tokens=False)[0]
    assert not allowed_tokens(constraint.next_mask(), VOCAB)[hello]
    assert not constraint.accept(hello) and constraint.refused == hello


@pytest.mark.parametrize("kind", ["json_schema", "json_object"])
def test_random_logits_under_the_mask_give_valid_json(
    compiler: GrammarCompiler, tokenizer: PreTrainedTokenizerBase, kind: str
) -> None:
    """What a 135M model cannot get wrong: any logits, masked, sampled greedily, end in valid JSON."""
    schema = json.dumps(SCHEMA) if kind == "json_schema" else None
    constraint = compiler.constraint(compiler.compile(GrammarSpec(kind, schema)))
    generator = torch.Generator().manual_seed(3)
    # Random logits ramble: favour closing quotes and braces, and EOS, so the answer ends within the loop.
    closing = torch.tensor([any(c in t for c in '"}') for t in tokenizer.convert_ids_to_tokens(range(VOCAB))])
    tokens: list[int] = []
    for _ in range(400):
        logits = torch.randn(1, VOCAB, generator=generator) + 3.0 * closing
        logits[0, EOS] += 6.0
        token = int(apply_token_masks(logits, [constraint.next_mask()]).argmax())
        assert constraint.accept(token)
        if token == EOS:
            break
        tokens.append(token)
    assert constraint.terminated
    value = json.loads(tokenizer.decode(tokens))
    assert isinstance(value, dict)
    if kind == "json_schema":
        jsonschema.validate(value, SCHEMA)


def test_bad_schemas_are_grammar_errors(compiler: GrammarCompiler) -> None:
    with pytest.raises(GrammarError):
        compiler.compile(GrammarSpec("json_schema", "{not json"))
    with pytest.raises(GrammarError):
        compiler.compile(GrammarSpec("json_schema", json.dumps({"type": "no-such-type"})))
    with pytest.raises(GrammarError):
        compiler.compile(GrammarSpec("regex", None))


def test_apply_masks_only_rows_with_a_mask() -> None:
    logits = torch.zeros(2, 40)
    mask = torch.zeros(2, dtype=torch.int32)
    mask[1] = 1 << 3  # token 35 only
    out = apply_token_masks(logits, [None, mask.numpy().tobytes()])
    assert torch.isfinite(out[0]).all()
    assert out[1].isfinite().nonzero().flatten().tolist() == [35]


class FakeConstraint:
    """Allows tokens below `limit`; terminated after accepting `end`."""

    def __init__(self, limit: int = 50, end: int = 9) -> None:
        self.limit, self.end, self.accepted = limit, end, []
        self.masks = 0

    def next_mask(self) -> bytes:
        self.masks += 1
        return bytes([self.masks % 256]) + b"\x00\x00\x00"

    def accept(self, token: int) -> bool:
        if token >= self.limit:
            return False
        self.accepted.append(token)
        return True

    @property
    def terminated(self) -> bool:
        return bool(self.accepted) and self.accepted[-1] == self.end


def _scheduler() -> Scheduler:
    return Scheduler(SchedulerLimits(2, 8, 4), eos_token_ids=(EOS,))


def test_scheduler_sends_each_sampled_chunk_the_mask_after_the_last_token() -> None:
    constraint = FakeConstraint()
    s = _scheduler()
    s.add(Sequence("a", [5, 6, 7], SamplingParams(max_tokens=8), 64, constraint=constraint))
    first = s.schedule()
    assert first is not None and first.chunks[0].token_mask == b"\x01\x00\x00\x00"
    s.update(StepResult(first.step_id, (4,)))
    second = s.schedule()
    assert second is not None and second.chunks[0].token_mask == b"\x02\x00\x00\x00"
    assert constraint.accepted == [4]
    (update,) = s.update(StepResult(second.step_id, (9,)))
    assert update.finish_reason == "stop"  # the grammar completed: nothing may follow, EOS or not


def test_scheduler_ends_a_sequence_whose_token_broke_the_grammar() -> None:
    s = _scheduler()
    s.add(Sequence("a", [5, 6], SamplingParams(max_tokens=8), 64, constraint=FakeConstraint(limit=10)))
    batch = s.schedule()
    assert batch is not None
    (update,) = s.update(StepResult(batch.step_id, (11,)))
    assert update.finish_reason == "error"


def test_a_mask_crosses_the_stage_protocol_checked() -> None:
    limits = FrameLimits(hidden_size=16, vocab_size=100, kv_slots=4, max_len=64, max_step_tokens=32, max_chunks=4)
    mask = (b"\x01\x00\x00\x00") * mask_words(100)
    chunk = SeqChunk("a", 0, 0, (1, 2), SamplingParams(), True, mask)
    batch, _ = decode_request(encode_request(StepBatch(1, (chunk,)), None), limits)
    assert batch.chunks[0].token_mask == mask
    for bad in (mask[:-4], b"\x00" * len(mask)):
        msg = request_to_proto(StepBatch(2, (chunk,)), None)
        msg.chunks[0].token_mask = bad
        with pytest.raises(WireError):
            decode_request(msg.SerializeToString(), limits)
    msg = request_to_proto(StepBatch(3, (chunk,)), None)
    msg.chunks[0].sample = False
    with pytest.raises(WireError, match="does not sample"):
        decode_request(msg.SerializeToString(), limits)
