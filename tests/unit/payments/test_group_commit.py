"""Concurrent usage reports share commits; each caller gets its own record or error."""

import asyncio
from concurrent.futures import ThreadPoolExecutor

from payments.errors import NotFound, PaymentError
from payments.group_commit import GroupCommitter
from payments.protocol import SettlementRecord, UsageReport


def fake_record(report: UsageReport) -> SettlementRecord:
    return SettlementRecord(
        f"set_{report.request_id}",
        report.request_id,
        report.payer,
        report.model,
        report.prompt_tokens,
        report.completion_tokens,
        0,
        0,
        0,
        (),
        0.0,
    )


def test_reports_are_committed_in_groups() -> None:
    batches: list[int] = []

    def commit(reports: list[UsageReport]) -> list[SettlementRecord | PaymentError]:
        batches.append(len(reports))
        return [NotFound("x") if r.request_id == "bad" else fake_record(r) for r in reports]

    async def main() -> list[object]:
        committer = GroupCommitter(commit, max_batch=16, executor=ThreadPoolExecutor(1))
        ids = [str(i) for i in range(40)] + ["bad"]
        reports = [UsageReport(i, "p", "m", 1, 1, ()) for i in ids]
        return await asyncio.gather(*(committer.submit(r) for r in reports), return_exceptions=True)

    results = asyncio.run(main())
    assert sum(batches) == 41 and len(batches) <= 4 and max(batches) <= 16
    assert [r.request_id for r in results[:40]] == [str(i) for i in range(40)]  # type: ignore[union-attr]
    assert isinstance(results[40], NotFound)
