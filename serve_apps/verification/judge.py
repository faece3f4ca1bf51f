"""Compare two pipelines' traces and decide who is wrong (pure).

Stage k of both pipelines sees the same input when stages 0..k-1 agree, so the first disagreeing stage
is the one to blame; a reference recomputation of that stage (from the model's own weights, on the
served pipeline's stage-k input) says which pipeline's stage k is wrong, or both.
"""

from collections.abc import Sequence

from serve_apps.verification.fingerprint import matches
from serve_apps.verification.protocol import Culprit, StageTrace, TraceResult, Verdict


def same_layout(a: TraceResult, b: TraceResult) -> bool:
    """Both pipelines split the model's layers identically (stage-by-stage comparison is meaningful)."""
    return [(s.layer_start, s.layer_end) for s in a.stages] == [(s.layer_start, s.layer_end) for s in b.stages]


def first_mismatch(a: TraceResult, b: TraceResult, tolerance: float) -> int | None:
    """Index of the first stage whose fingerprints differ beyond `tolerance`, None when all agree."""
    for stage_a, stage_b in zip(a.stages, b.stages, strict=True):
        if not matches(stage_a.fingerprint, stage_b.fingerprint, tolerance):
            return stage_a.index
    return None


def precheck(served: TraceResult, other: TraceResult) -> Verdict | None:
    """An inconclusive verdict when the traces cannot be compared, else None."""
    for trace in (served, other):
        if trace.error is not None:
            return Verdict(
                "inconclusive",
                f"replica {trace.replica_id} could not trace: {trace.error}",
                served_replica=served.replica_id,
            )
    if served.replica_id == other.replica_id:
        return Verdict(
            "inconclusive", "no second pipeline: both traces came from one replica", served_replica=served.replica_id
        )
    if served.token_ids != other.token_ids or not same_layout(served, other):
        return Verdict(
            "inconclusive",
            "the pipelines traced different histories or split layers differently",
            served_replica=served.replica_id,
        )
    return None


def judge(
    served: TraceResult, other: TraceResult, stage: int | None, reference: Sequence[float] | None, tolerance: float
) -> Verdict:
    """The verdict for a first mismatch at `stage` (None: the traces agree) given the reference
    fingerprint of that stage (None: no reference could be computed)."""
    if stage is None:
        return Verdict("passed", "every stage agrees", served_replica=served.replica_id)
    if reference is None:
        return Verdict(
            "inconclusive",
            f"stage {stage} disagrees and no reference was computed",
            stage,
            served_replica=served.replica_id,
        )
    wrong = [t for t in (served, other) if not matches(t.stages[stage].fingerprint, reference, tolerance)]
    if not wrong:
        return Verdict(
            "inconclusive",
            f"stage {stage} disagrees, yet both are within tolerance of the reference",
            stage,
            served_replica=served.replica_id,
        )
    culprits = tuple(_culprit(t.replica_id, t.stages[stage]) for t in wrong)
    names = ", ".join(f"{c.replica_id} (node {c.node_id[:12]})" for c in culprits)
    return Verdict("failed", f"stage {stage} differs from the reference on {names}", stage, culprits, served.replica_id)


def _culprit(replica_id: str, stage: StageTrace) -> Culprit:
    return Culprit(replica_id, stage.index, stage.node_id, stage.wallet)
