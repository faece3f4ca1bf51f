"""Served-traffic audits on the tiny model: real KV-cached StageWorker steps (mixed decode + prefill
batches) observed as a hub coordinator sees them, re-executed cache-free on reference weights."""

import asyncio
import secrets
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from transformers import LlamaForCausalLM

from cluster.config.network import NetworkSection
from serve_apps.engine.kv_cache import BatchView, Row
from serve_apps.engine.layer_split import StageSpec, split_layers
from serve_apps.engine.messages import SamplingParams, SeqChunk, StepBatch, StepResult
from serve_apps.engine.stage_model import StageModel, build_stage
from serve_apps.engine.stage_worker import StageConfig, StageWorker
from serve_apps.verification.audit import AuditedStage, AuditJob, AuditLimits, ServedAudit, judge, reexecute
from serve_apps.verification.auditor import Auditor, AuditorSettings
from serve_apps.verification.trace import trace_forward
from tests.unit.verification.served_chain import GREEDY, perturb_weights, serve, step

PROMPTS = {
    "a": [5, 17, 99, 3, 250, 8, 41, 7, 11, 300, 2, 64, 9, 18, 77, 123, 45, 6, 200, 31],
    "b": [1, 2, 3, 4, 5, 6, 7],
}
PROMPTS["c"] = list(range(40, 73))
DECODE = 10


def configs(model_dir: Path, dtype: str = "float32", quant: str = "none") -> list[StageConfig]:
    return [
        StageConfig(str(model_dir), spec, dtype, 4, 128, 1, weight_quant=quant, low_bit_max_tokens=12)  # type: ignore[arg-type]
        for spec in split_layers(6, 3)
    ]


def chain(cfgs: list[StageConfig], audit: ServedAudit, providers: tuple[str, ...] = ("p0", "p1")) -> list[StageWorker]:
    for index, provider in enumerate(providers):
        audit.set_stage(index, AuditedStage(provider, f"wallet-{provider}", cfgs[index]))
    return [StageWorker(c) for c in cfgs]


_models: dict[Any, StageModel] = {}


def reference(job: AuditJob) -> StageModel:
    if job.stage.key not in _models:
        config = job.stage.config
        model = build_stage(Path(config.model_dir), config.spec, getattr(torch, config.dtype))
        model.quantize(config.weight_quant, config.low_bit_max_tokens)
        _models[job.stage.key] = model
    return _models[job.stage.key]


def verdicts(jobs: list[AuditJob]) -> dict[tuple[str, int], Any]:
    return {(j.seq_id, j.stage.config.spec.index): judge(j, reexecute(reference(j), j)) for j in jobs}


def all_audited() -> ServedAudit:
    return ServedAudit(AuditLimits(fraction=1.0))


def cache_free(pipeline: list[StageWorker], tokens: list[int]) -> list[torch.Tensor]:
    """Each stage's `trace_forward` output over the whole history, stage after stage."""
    current, outputs = torch.tensor([tokens]), []
    for worker in pipeline:
        current = trace_forward(worker.model, current)
        outputs.append(current)
    return outputs


def test_the_cache_free_forward_is_the_unsharded_models_forward(tiny_dir: Path) -> None:
    pipeline = [StageWorker(c) for c in configs(tiny_dir)]
    last_hidden = cache_free(pipeline, PROMPTS["a"])[-1]
    logits = pipeline[-1].model.logits(last_hidden[0])
    unsharded = LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    torch.testing.assert_close(logits, unsharded(torch.tensor([PROMPTS["a"]])).logits[0], atol=1e-4, rtol=1e-4)


def test_the_cache_free_forward_does_not_depend_on_what_the_stage_is_serving(tiny_dir: Path) -> None:
    pipeline = [StageWorker(c) for c in configs(tiny_dir)]
    before = cache_free(pipeline, PROMPTS["a"])
    step(pipeline, StepBatch(0, (SeqChunk("other", 0, 0, (1, 2, 3), GREEDY),)))  # fills slot 0's KV cache
    for out, again in zip(before, cache_free(pipeline, PROMPTS["a"]), strict=True):
        assert torch.equal(out, again)


def test_an_honest_chain_passes_every_audit(tiny_dir: Path) -> None:
    audit = all_audited()
    served = serve(chain(configs(tiny_dir), audit), PROMPTS, DECODE, audit)
    assert sorted((j.seq_id, j.stage.provider_id) for j in served.jobs) == [(s, p) for s in "abc" for p in ("p0", "p1")]
    for job in served.jobs:
        assert job.num_tokens == len(PROMPTS[job.seq_id]) + DECODE - 1  # the last sampled token is never fed
        assert job.request_id == f"req-{job.seq_id}"
    results = verdicts(served.jobs)
    assert all(v.passed for v in results.values()), {k: v.reason for k, v in results.items()}
    assert audit.in_flight == 0


def test_an_honest_int4_stage_passes_when_the_reference_uses_low_bit_rows_as_served(tiny_dir: Path) -> None:
    audit = all_audited()
    served = serve(chain(configs(tiny_dir, "bfloat16", "int4"), audit), PROMPTS, DECODE, audit)
    job = next(j for j in served.jobs if j.seq_id == "c" and j.stage.config.spec.index == 1)
    assert job.low_bit.any() and not job.low_bit.all()  # decode steps low-bit, prefill chunks dense
    results = verdicts(served.jobs)
    assert all(v.passed for v in results.values()), {k: v.reason for k, v in results.items()}
    dense = AuditJob(job.request_id, job.seq_id, job.stage, job.inputs, torch.zeros_like(job.low_bit), job.commitment)
    # Random weights are far from their int4 grid: an all-dense reference would blame an honest stage.
    assert judge(dense, reexecute(reference(dense), dense)).stats["mean_ulps"] > results[("c", 1)].stats["mean_ulps"]


@pytest.mark.parametrize("noise", [0.01, 0.05, 0.10])  # float32: even 1 % is caught
def test_a_stage_with_perturbed_weights_fails_and_only_that_stage(tiny_dir: Path, noise: float) -> None:
    audit = all_audited()
    pipeline = chain(configs(tiny_dir), audit)
    perturb_weights(pipeline[1], noise_scale=noise, seed=3)
    results = verdicts(serve(pipeline, PROMPTS, DECODE, audit).jobs)
    assert all(results[(s, 0)].passed for s in "abc")
    assert not any(results[(s, 1)].passed for s in "abc")
    assert {results[(s, 1)].provider_id for s in "abc"} == {"p1"}


def skip_stage_at(seq_id: str, positions: set[int]):  # type: ignore[no-untyped-def]
    """A provider that skips its layers (answers its input) for a few positions of one sequence."""

    def tamper(index: int, batch: StepBatch, hidden: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
        if index != 1 or hidden is None:
            return out
        out = out.clone()
        view = BatchView.of([Row(c.slot, c.start_pos, len(c.token_ids)) for c in batch.chunks])
        offset = 0
        for i in view.order:
            chunk = batch.chunks[i]
            for j in range(len(chunk.token_ids)):
                if chunk.seq_id == seq_id and chunk.start_pos + j in positions:
                    out[offset + j] = hidden[offset + j]
            offset += len(chunk.token_ids)
        return out

    return tamper


def test_a_stage_wrong_on_two_positions_only_is_caught_there(tiny_dir: Path) -> None:
    audit = all_audited()
    pipeline = chain(configs(tiny_dir), audit)
    results = verdicts(serve(pipeline, PROMPTS, DECODE, audit, skip_stage_at("a", {12, 24})).jobs)
    bad = results[("a", 1)]
    assert not bad.passed and bad.worst_position in {12, 24}
    assert all(v.passed for key, v in results.items() if key != ("a", 1))


def test_non_audited_sequences_keep_nothing(tiny_dir: Path) -> None:
    audit = ServedAudit(AuditLimits(fraction=0.0))
    served = serve(chain(configs(tiny_dir), audit), PROMPTS, 3, audit)
    assert served.jobs == [] and audit.stats.positions_kept == 0 and audit.stats.audited == 0


def test_kept_positions_and_audited_sequences_are_capped(tiny_dir: Path) -> None:
    audit = ServedAudit(AuditLimits(fraction=1.0, max_tokens=16, max_sequences=2))
    served = serve(chain(configs(tiny_dir), audit), PROMPTS, 4, audit)
    assert audit.stats.audited == 2 and audit.stats.skipped_full == 1  # "c" was drawn, but 2 were in flight
    assert {j.seq_id for j in served.jobs} == {"a", "b"}
    assert {j.num_tokens for j in served.jobs if j.seq_id == "a"} == {16}  # capped
    assert {j.num_tokens for j in served.jobs if j.seq_id == "b"} == {len(PROMPTS["b"]) + 3}
    assert audit.stats.positions_over_cap == 2 * (len(PROMPTS["a"]) + 3 - 16)
    assert all(v.passed for v in verdicts(served.jobs).values())  # a capped prefix still re-executes


def test_the_limits_come_from_the_network_settings() -> None:
    network = NetworkSection.model_validate(
        {"verification_fraction": 0.1, "verification": {"max_tokens": 256, "audit_max_sequences": 8}}
    )
    assert AuditLimits.from_network(network) == AuditLimits(fraction=0.1, max_tokens=256, max_sequences=8)
    assert AuditLimits.from_network(NetworkSection()) == AuditLimits(fraction=0.02, max_tokens=128, max_sequences=64)
    with pytest.raises(ValidationError):
        NetworkSection.model_validate({"verification": {"max_concurrent": 2}})  # the old spot-check's setting


def test_the_audit_fraction_is_drawn_from_secrets() -> None:
    audit = ServedAudit(AuditLimits(fraction=0.2, max_sequences=10**6))
    assert isinstance(audit._draw, secrets.SystemRandom)
    drawn = sum(audit.admit(f"s{i}", f"r{i}") for i in range(5000))
    assert abs(drawn - 1000) < 4 * (5000 * 0.2 * 0.8) ** 0.5
    assert audit.admit("s0", "r0") == audit.is_audited("s0")  # decided once per sequence


def prefill(seq_id: str, history: list[int], slot: int) -> SeqChunk:
    return SeqChunk(seq_id, slot, 0, tuple(history), GREEDY)


def decode(pipeline: list[StageWorker], audit: ServedAudit, history: list[int], steps: int, start: int) -> int:
    for n in range(steps):
        token = step(
            pipeline, StepBatch(start + n, (SeqChunk("a", 0, len(history) - 1, (history[-1],), GREEDY),)), audit
        )
        history.append(token.token_ids[0])
    return start + steps


def test_a_replay_after_failover_audits_the_work_before_and_after_it(tiny_dir: Path) -> None:
    cfgs = configs(tiny_dir)
    audit = all_audited()
    audit.admit("a", "req-a")
    history = list(PROMPTS["a"])
    pipeline = chain(cfgs, audit)
    history.append(step(pipeline, StepBatch(0, (prefill("a", history, 0),)), audit).token_ids[0])
    n = decode(pipeline, audit, history, 4, 1)
    # Stage 1's provider is gone: a new one takes it, every stage lost its cache, the sequence replays
    # its whole history but the last token from position 0, then goes on decoding.
    audit.drop("a")
    pipeline = chain(cfgs, audit, ("p0", "p1-new"))
    step(pipeline, StepBatch(n, (SeqChunk("a", 0, 0, tuple(history[:-1]), GREEDY, sample=False),)), audit)
    decode(pipeline, audit, history, 3, n + 1)
    jobs = audit.finish("a")
    assert sorted((j.stage.provider_id, j.num_tokens) for j in jobs) == [
        ("p0", len(PROMPTS["a"]) + 4),
        ("p0", len(history) - 1),
        ("p1", len(PROMPTS["a"]) + 4),
        ("p1-new", len(history) - 1),
    ]
    assert all(v.passed for v in [judge(j, reexecute(reference(j), j)) for j in jobs])


def test_replacing_a_stage_closes_the_old_providers_record(tiny_dir: Path) -> None:
    cfgs = configs(tiny_dir)
    audit = all_audited()
    audit.admit("a", "req-a")
    pipeline = chain(cfgs, audit)
    history = list(PROMPTS["a"])
    history.append(step(pipeline, StepBatch(0, (prefill("a", history, 0),)), audit).token_ids[0])
    audit.set_stage(1, None)  # an operator stage takes over: not audited from here on
    decode(pipeline, audit, history, 2, 1)
    jobs = audit.finish("a")
    assert sorted((j.stage.provider_id, j.num_tokens) for j in jobs) == [
        ("p0", len(history) - 1),
        ("p1", len(PROMPTS["a"])),
    ]


def stage_config(index: int, first: bool) -> StageConfig:
    return StageConfig("/nowhere", StageSpec(index, 0, 2, first=first, last=False), "float32", 4, 64, 1)


def test_rows_are_mapped_through_the_stages_layout_order() -> None:
    audit = all_audited()
    audit.set_stage(1, AuditedStage("p1", None, stage_config(1, first=False)))
    for seq in "xyz":
        audit.admit(seq, f"r-{seq}")
    # step order: a prefill chunk, then decodes on slots 2 and 1; layout: slot 1, slot 2, then the chunk
    batch = StepBatch(
        0,
        (
            SeqChunk("x", 0, 0, (1, 2, 3), GREEDY),
            SeqChunk("y", 2, 0, (4,), GREEDY),
            SeqChunk("z", 1, 0, (5,), GREEDY),
        ),
    )
    assert BatchView.of([Row(c.slot, c.start_pos, len(c.token_ids)) for c in batch.chunks]).order == (2, 1, 0)
    inputs = torch.arange(5, dtype=torch.float32).view(5, 1).expand(5, 8).contiguous()  # row r is all r
    audit.observe(1, batch, inputs, inputs * 2)
    jobs = {j.seq_id: j for s in "xyz" for j in audit.finish(s)}
    assert jobs["z"].inputs[:, 0].tolist() == [0.0]
    assert jobs["y"].inputs[:, 0].tolist() == [1.0]
    assert jobs["x"].inputs[:, 0].tolist() == [2.0, 3.0, 4.0]


def test_a_gap_audits_only_the_prefix_before_it() -> None:
    audit = all_audited()
    audit.set_stage(0, AuditedStage("p0", None, stage_config(0, first=True)))
    audit.admit("x", "r-x")
    for start, length in ((0, 5), (10, 3)):  # positions 5-9 never observed
        batch = StepBatch(0, (SeqChunk("x", 0, start, tuple(range(length)), GREEDY),))
        audit.observe(0, batch, None, torch.randn(length, 8))
    [job] = audit.finish("x")
    assert job.num_tokens == 5 and job.inputs.dtype == torch.long and audit.stats.incomplete == 1


def test_a_malformed_commitment_fails_the_job(tiny_dir: Path) -> None:
    audit = all_audited()
    served = serve(chain(configs(tiny_dir), audit), {"b": PROMPTS["b"]}, 2, audit)
    job = served.jobs[0]
    forged = AuditJob(job.request_id, job.seq_id, job.stage, job.inputs, job.low_bit, job.commitment[:-3])
    verdict = judge(forged, reexecute(reference(forged), forged))
    assert not verdict.passed and "malformed" in verdict.reason


class _Sanctions:
    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []

    async def record(self, provider_id: str, passed: bool) -> None:
        self.calls.append(("record", provider_id, str(passed)))

    async def withhold(self, request_id: str, wallet: str, reason: str) -> None:
        self.calls.append(("withhold", request_id, wallet))

    async def evict(self, provider_id: str, reason: str) -> None:
        self.calls.append(("evict", provider_id))


def test_the_auditor_queue_is_bounded_and_a_broken_job_is_counted(tiny_dir: Path) -> None:
    audit = all_audited()
    jobs = serve(chain(configs(tiny_dir), audit), {"b": PROMPTS["b"]}, 2, audit).jobs
    sanctions = _Sanctions()
    auditor = Auditor(sanctions, AuditorSettings(max_queued=2, failures_to_evict=1))
    broken = replace(jobs[0], stage=replace(jobs[0].stage, config=replace(jobs[0].stage.config, model_dir="/nowhere")))
    assert auditor.submit([broken, *jobs, jobs[0]]) == 2  # the third and fourth are dropped
    assert auditor.stats.dropped_full == 2
    assert asyncio.run(auditor.run_one()) is None and auditor.stats.errors == 1
    verdict = asyncio.run(auditor.run_one())
    assert verdict is not None and verdict.passed and sanctions.calls == [("record", "p0", "True")]


def test_a_failed_audit_is_recorded_withheld_and_evicts_after_the_set_failures(tiny_dir: Path) -> None:
    audit = all_audited()
    pipeline = chain(configs(tiny_dir), audit)
    perturb_weights(pipeline[1], noise_scale=0.1, seed=3)
    jobs = [j for j in serve(pipeline, PROMPTS, 3, audit).jobs if j.stage.provider_id == "p1"]
    sanctions = _Sanctions()
    auditor = Auditor(sanctions, AuditorSettings(failures_to_evict=2))
    auditor.submit(jobs)

    async def run_all() -> None:
        while auditor.queue:
            await auditor.run_one()

    asyncio.run(run_all())
    assert auditor.stats.failed == 3 and auditor.stats.evicted == ["p1"]
    assert sanctions.calls.count(("evict", "p1")) == 1
    assert sorted(c[1] for c in sanctions.calls if c[0] == "withhold") == ["req-a", "req-b", "req-c"]


SEEDED = SamplingParams(temperature=0.8, top_p=0.9, seed=1234, max_tokens=4096)
UNSEEDED = SamplingParams(temperature=1.0, max_tokens=4096)


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED, UNSEEDED], ids=["greedy", "seeded", "unseeded"])
def test_an_honest_last_stage_passes_its_token_audit(tiny_dir: Path, sampling: SamplingParams) -> None:
    audit = all_audited()
    served = serve(chain(configs(tiny_dir), audit, ("p0", "p1", "p2")), PROMPTS, DECODE, audit, sampling=sampling)
    last = [j for j in served.jobs if j.stage.provider_id == "p2"]
    assert len(last) == 3 and all(j.commitment == b"" for j in last)
    for job in last:
        history = served.histories[job.seq_id]
        assert [t for _, t in job.sampled] == history[len(PROMPTS[job.seq_id]) :][: len(job.sampled)]
        assert len(job.sampled) == DECODE  # the prompt's last chunk samples one, each decode one more
    results = verdicts(served.jobs)
    assert all(v.passed for v in results.values()), {k: v.reason for k, v in results.items()}


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_a_last_stage_sampling_under_a_grammar_mask_passes_with_the_mask(
    tiny_dir: Path, sampling: SamplingParams
) -> None:
    """The reference applies each token's mask as the last stage did; without it an honest stage would fail."""
    words = torch.zeros(512 // 32, dtype=torch.int32)
    words[3:5] = -1  # tokens 96..159 only
    mask = words.numpy().tobytes()
    audit = all_audited()
    pipeline = chain(configs(tiny_dir), audit, ("p0", "p1", "p2"))
    served = serve(pipeline, PROMPTS, DECODE, audit, sampling=sampling, token_mask=mask)
    last = [j for j in served.jobs if j.stage.provider_id == "p2"]
    assert all(96 <= t < 160 for j in last for _, t in j.sampled)
    assert all(len(j.masks) == len(j.sampled) and set(j.masks) == {mask} for j in last)
    results = verdicts(served.jobs)
    assert all(v.passed for v in results.values()), {k: v.reason for k, v in results.items()}
    unmasked = [replace(j, masks=()) for j in last]
    assert not all(judge(j, reexecute(reference(j), j)).passed for j in unmasked)


def swap_tokens(every: int):  # type: ignore[no-untyped-def]
    """A last stage that answers a different token every `every` steps."""

    def tamper(index: int, batch: StepBatch, hidden: torch.Tensor | None, out: Any) -> Any:
        if not isinstance(out, StepResult) or batch.step_id % every:
            return out
        return StepResult(out.step_id, tuple(t if t < 0 else (t + 1) % 512 for t in out.token_ids))

    return tamper


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_a_last_stage_that_answers_other_tokens_fails(tiny_dir: Path, sampling: SamplingParams) -> None:
    audit = all_audited()
    pipeline = chain(configs(tiny_dir), audit, ("p0", "p1", "p2"))
    served = serve(pipeline, PROMPTS, DECODE, audit, swap_tokens(every=3), sampling=sampling)
    results = verdicts(served.jobs)
    assert not any(results[(s, 2)].passed for s in "abc")
    assert all(results[(s, i)].passed for s in "abc" for i in (0, 1))
