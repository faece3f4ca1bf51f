"""Cache-free stage traces on real (tiny) weights: equal to the unsharded model, blind to the KV cache,
and a perturbed stage is caught at exactly that stage and pinned by the referee."""

from pathlib import Path
from typing import Any

import torch
from transformers import LlamaForCausalLM

from serve_apps.engine.layer_split import split_layers
from serve_apps.engine.messages import SamplingParams, SeqChunk, StepBatch
from serve_apps.engine.stage_worker import StageConfig, StageWorker
from serve_apps.verification.fingerprint import distance
from serve_apps.verification.judge import first_mismatch, judge
from serve_apps.verification.protocol import StageTrace, TraceResult
from serve_apps.verification.referee import reference_fingerprint, stage_spec

TOKENS = [5, 17, 99, 3, 250, 8, 41, 7]
DIMS, TOL = 8, 5e-3


def workers(model_dir: Path, stages: int = 3) -> list[StageWorker]:
    return [StageWorker(StageConfig(str(model_dir), spec, "float32", 2, 64, 1)) for spec in split_layers(6, stages)]


def trace(pipeline: list[StageWorker], replica: str) -> tuple[TraceResult, list[torch.Tensor]]:
    current: torch.Tensor = torch.tensor([TOKENS])
    stages, inputs = [], []
    for worker in pipeline:
        inputs.append(current)
        current, print_ = worker.trace(current, DIMS)
        spec = worker.spec
        stages.append(
            StageTrace(spec.index, spec.start, spec.end, f"{replica}-node{spec.index}", f"w-{replica}", print_)
        )
    result = TraceResult(replica, "tiny", "", "float32", tuple(TOKENS), tuple(stages), tuple(inputs))
    return result, [current]


def test_the_trace_is_the_unsharded_models_forward(tiny_dir: Path) -> None:
    pipeline = workers(tiny_dir)
    _, [last_hidden] = trace(pipeline, "a")
    logits = pipeline[-1].model.logits(last_hidden[0])
    reference = LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)(torch.tensor([TOKENS])).logits[0]
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)


def test_the_trace_does_not_depend_on_what_the_stage_is_serving(tiny_dir: Path) -> None:
    pipeline = workers(tiny_dir)
    before, _ = trace(pipeline, "a")
    hidden: Any = None
    batch = StepBatch(0, (SeqChunk("other", 0, 0, (1, 2, 3), SamplingParams(temperature=0.0)),))
    for worker in pipeline:  # fill slot 0's KV cache with another sequence
        hidden = worker.forward(batch, hidden)
    after, _ = trace(pipeline, "a")
    assert [s.fingerprint for s in after.stages] == [s.fingerprint for s in before.stages]


def test_a_perturbed_stage_is_found_and_pinned_by_the_referee(tiny_dir: Path) -> None:
    healthy, faulty = workers(tiny_dir), workers(tiny_dir)
    assert faulty[1].inject_fault(1, noise_scale=0.5, seed=3)
    assert not faulty[0].inject_fault(1, noise_scale=0.5, seed=3)  # only stage 1 takes it
    good, _ = trace(healthy, "good")
    bad, _ = trace(faulty, "bad")
    assert distance(good.stages[0].fingerprint, bad.stages[0].fingerprint) == 0.0
    stage = first_mismatch(bad, good, TOL)
    assert stage == 1 and distance(good.stages[1].fingerprint, bad.stages[1].fingerprint) > 0.05

    spec = stage_spec(1, bad.stages[1].layer_start, bad.stages[1].layer_end, len(bad.stages))
    reference = reference_fingerprint(str(tiny_dir), spec, "float32", bad.inputs[1], DIMS)
    verdict = judge(bad, good, stage, reference, TOL)
    assert verdict.outcome == "failed" and verdict.stage_index == 1
    assert [(c.replica_id, c.node_id, c.wallet) for c in verdict.culprits] == [("bad", "bad-node1", "w-bad")]
    assert verdict.served_culprits == verdict.culprits  # "bad" served the request

    # Served by the healthy pipeline and checked on the faulty one: the checker is blamed, not the server.
    reference = reference_fingerprint(str(tiny_dir), spec, "float32", good.inputs[1], DIMS)
    verdict = judge(good, bad, first_mismatch(good, bad, TOL), reference, TOL)
    assert [c.replica_id for c in verdict.culprits] == ["bad"] and verdict.served_culprits == ()


def test_a_fault_for_another_nodes_label_is_not_applied(tiny_dir: Path) -> None:
    worker = workers(tiny_dir, 1)[0]
    assert not worker.inject_fault(0, 0.5, 0, node_label="solanalm.io/wallet=someone-else")
