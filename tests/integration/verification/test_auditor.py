"""The auditor actor end to end: jobs from a real KV-cached tiny chain, re-executed on the head, reported
through RaySanctions to a registry and a payments actor (stand-ins with the real actors' method names)."""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import torch
from transformers import LlamaForCausalLM

from cluster.config.network import NetworkSection
from cluster.config.payments import PaymentsSection
from cluster.config.root import load_settings
from cluster.models import load_catalogue, materialize
from cluster.models.tiny import tiny_llama_config
from payments.protocol import WithheldPayout, WithholdPayout
from serve_apps.engine.layer_split import split_layers
from serve_apps.engine.stage_model import build_stage
from serve_apps.engine.stage_worker import StageConfig, StageWorker
from serve_apps.verification.audit import AuditedStage, AuditJob, AuditLimits, ServedAudit, judge, reexecute
from serve_apps.verification.auditor import AuditorSettings, RaySanctions, get_or_create_auditor
from tests.unit.verification.served_chain import perturb_weights, serve

pytestmark = pytest.mark.usefixtures("ray_cluster")
NAMESPACE = "solanalm-test"
PROMPTS = {"a": [5, 17, 99, 3, 250, 8, 41, 7, 11, 300], "b": [1, 2, 3, 4, 5, 6, 7], "c": list(range(40, 60))}


@ray.remote(num_cpus=0)
class _FakeRegistry:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def record_verification(self, node_ids: list[str], passed: bool) -> list[str]:
        self.calls.append(("record", (tuple(node_ids), passed)))
        return []

    def set_draining(self, node_id: str, draining: bool = True) -> None:
        self.calls.append(("drain", (node_id, draining)))

    def all(self) -> list[tuple[str, Any]]:
        return self.calls


@ray.remote(num_cpus=0)
class _FakePayments:
    def __init__(self) -> None:
        self.withheld: list[WithholdPayout] = []

    def withhold_payout(self, req: WithholdPayout) -> WithheldPayout:
        self.withheld.append(req)
        return WithheldPayout(req.request_id, f"settle-{req.request_id}", 10, req.wallets)

    def all(self) -> list[WithholdPayout]:
        return self.withheld


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama-auditor")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(vocab_size=512, num_layers=6)).save_pretrained(path)
    return path


@pytest.fixture
def actors() -> Iterator[tuple[Any, Any, Any]]:
    network = NetworkSection(registry_name="fake-registry-auditor-test")
    payments = PaymentsSection(actor_name="fake-payments-auditor-test")
    registry = _FakeRegistry.options(name=network.registry_name, namespace=NAMESPACE).remote()  # type: ignore[attr-defined]
    pay = _FakePayments.options(name=payments.actor_name, namespace=NAMESPACE).remote()  # type: ignore[attr-defined]
    names = {"actor_name": payments.actor_name, "actor_call_timeout_s": payments.actor_call_timeout_s}
    sanctions = RaySanctions(network.model_dump(mode="json"), names, NAMESPACE)
    auditor = get_or_create_auditor(
        sanctions, NAMESPACE, AuditorSettings(failures_to_evict=2), name="solanalm-auditor-test"
    )
    yield auditor, registry, pay
    for actor in (auditor, registry, pay):
        ray.kill(actor)


def served_jobs(model_dir: Path, noise: float = 0.0) -> list[AuditJob]:
    configs = [StageConfig(str(model_dir), spec, "float32", 4, 64, 1) for spec in split_layers(6, 3)]
    audit = ServedAudit(AuditLimits(fraction=1.0))
    for index in (0, 1):
        audit.set_stage(index, AuditedStage(f"p{index}", f"wallet-p{index}", configs[index]))
    pipeline = [StageWorker(c) for c in configs]
    if noise:
        perturb_weights(pipeline[1], noise_scale=noise, seed=3)
    return serve(pipeline, PROMPTS, 6, audit, request_prefix=f"req-{noise}").jobs


def test_honest_jobs_pass_and_a_perturbed_provider_is_reported_unpaid_and_drained(
    tiny_dir: Path, actors: tuple[Any, Any, Any]
) -> None:
    auditor, registry, payments = actors
    assert ray.get(auditor.submit.remote(served_jobs(tiny_dir)), timeout=60) == 6
    assert ray.get(auditor.drain.remote(120.0), timeout=130)
    stats = ray.get(auditor.stats.remote(), timeout=30)
    assert (stats["passed"], stats["failed"], stats["errors"]) == (6, 0, 0)
    calls = ray.get(registry.all.remote(), timeout=30)
    assert sorted(calls) == sorted([("record", (("p0",), True))] * 3 + [("record", (("p1",), True))] * 3)

    assert ray.get(auditor.submit.remote(served_jobs(tiny_dir, noise=0.05)), timeout=60) == 6
    assert ray.get(auditor.drain.remote(120.0), timeout=130)
    stats = ray.get(auditor.stats.remote(), timeout=30)
    assert (stats["passed"], stats["failed"]) == (9, 3) and stats["failures"] == {"p1": 3}
    assert stats["evicted"] == ["p1"]
    calls = ray.get(registry.all.remote(), timeout=30)[6:]
    assert calls.count(("record", (("p1",), False))) == 3 and calls.count(("record", (("p0",), True))) == 3
    assert [c for c in calls if c[0] == "drain"] == [("drain", ("p1", True))]  # once, at the 2nd failure
    withheld = ray.get(payments.all.remote(), timeout=30)
    assert sorted(w.request_id for w in withheld) == ["req-0.05-a", "req-0.05-b", "req-0.05-c"]
    assert {w.wallets for w in withheld} == {("wallet-p1",)}
    assert all("audit failed" in w.reason for w in withheld)


@pytest.mark.slow  # SmolLM2-135M, bfloat16 with int4 decode steps (the real default): ~1 min on 2 cores
def test_the_calibration_holds_on_smollm2_bfloat16_int4() -> None:
    """Honest stages (KV-cached mixed batches, int4 decode steps) pass against the cache-free reference;
    5 % weight noise on one stage fails it, and only it (thresholds: commitments.Tolerance)."""
    settings = load_settings()
    model_dir = materialize(
        load_catalogue(settings.model.catalogue).get("smollm2-135m-instruct"), settings.model.cache_dir
    )
    configs = [
        StageConfig(str(model_dir), spec, "bfloat16", 3, 128, 2, weight_quant="int4", low_bit_max_tokens=12)
        for spec in split_layers(30, 3)
    ]
    generator = torch.Generator().manual_seed(7)
    prompts = {f"s{i}": torch.randint(3, 49152, (n,), generator=generator).tolist() for i, n in enumerate((40, 23))}
    models = {}
    for noise in (0.0, 0.05):
        audit = ServedAudit(AuditLimits(fraction=1.0))
        for index, config in enumerate(configs):
            audit.set_stage(index, AuditedStage(f"p{index}", None, config))
        pipeline = [StageWorker(c) for c in configs]
        if noise:
            perturb_weights(pipeline[1], noise_scale=noise, seed=3)
        outcome = {}
        for job in serve(pipeline, prompts, 16, audit).jobs:
            index = job.stage.config.spec.index
            if index not in models:
                models[index] = build_stage(model_dir, configs[index].spec, torch.bfloat16)
                models[index].quantize("int4", 12)
            outcome[(job.seq_id, index)] = judge(job, reexecute(models[index], job))
        expected = {key: not (noise and key[1] == 1) for key in outcome}
        assert {k: v.passed for k, v in outcome.items()} == expected, {k: v.stats for k, v in outcome.items()}
