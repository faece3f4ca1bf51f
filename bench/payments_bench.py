"""Payments benchmark: ledger settlement records per second, payouts per on-chain transaction.

    .venv/bin/python bench/payments_bench.py --records 20000 --group 256 --postgres auto

Prints one JSON object. Records go through the real ledger (SQLite file, WAL, synchronous=FULL by
default) with holds placed beforehand; payouts are real transactions executed on LiteSVM.

`--postgres URL` (or `auto`: a throwaway cluster from tests/postgres.py, Debian's postgresql binaries) adds
the scale-out runs on PostgreSQL beside SQLite: whole requests (hold, then usage report through a group
commit) from 1 and several concurrent gateways spread over 1 and several payments workers (each worker its
own engine, one DB thread and group committer, as a payments actor has), and payouts/s of a settle pass.
"""

import argparse
import asyncio
import itertools
import json
import platform
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from solders.keypair import Keypair

from cluster.config.payments import PaymentsSection
from payments.chain.tx import AssetSpec, BudgetSpec, PayoutLine, fit_lines
from payments.deposits import deposit_transaction
from payments.group_commit import GroupCommitter
from payments.ledger.ledger import Ledger, SplitPolicy, make_engine
from payments.pricing import Price
from payments.protocol import DepositRequest, HoldRequest, ProviderShare, UsageReport
from payments.service import PaymentsService


def bench_ledger(records: int, group: int, synchronous: str, providers: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        ledger = Ledger(
            make_engine(f"sqlite:///{Path(tmp) / 'bench.sqlite3'}", synchronous),
            lambda _m: Price(1_000, 2_000),
            SplitPolicy(500, 100),
        )
        payer = str(Keypair().pubkey())
        wallets = [str(Keypair().pubkey()) for _ in range(providers)]
        ledger.credit_deposit("bench-deposit", payer, 10**15, slot=1)
        for i in range(records):
            ledger.place_hold(HoldRequest(f"r{i}", payer, "m", max_tokens=256, prompt_tokens=128))
        reports = [
            UsageReport(
                f"r{i}",
                payer,
                "m",
                128,
                200,
                (
                    ProviderShare(wallets[i % providers], 16),
                    ProviderShare(wallets[(i + 1) % providers], 14),
                ),
            )
            for i in range(records)
        ]
        start = time.perf_counter()
        for k in range(0, records, group):
            results = ledger.record_usage(reports[k : k + group])
            if any(isinstance(r, Exception) for r in results):
                raise RuntimeError(results)
        elapsed = time.perf_counter() - start
        ledger.engine.dispose()
    return {
        "records": records,
        "group_commit": group,
        "sqlite_synchronous": synchronous,
        "seconds": round(elapsed, 3),
        "records_per_s": round(records / elapsed, 1),
    }


def bench_payouts() -> dict[str, Any]:
    """Transfers fitting one transaction (size and instruction trace), to existing accounts."""
    treasury = Keypair()
    budget = BudgetSpec(1_400_000, 1_000)
    out: dict[str, Any] = {}
    for name, asset in (("sol", AssetSpec(None, 9)), ("spl", AssetSpec(Keypair().pubkey(), 6))):
        lines = [PayoutLine(Keypair().pubkey(), 10**6) for _ in range(256)]
        for kind, versioned in (("legacy", False), ("v0", True)):
            out[f"{kind}_{name}_transfers_per_tx"] = fit_lines(
                treasury, asset, lines, "b" + "0" * 15, budget, 256, versioned
            )
    return out


async def bench_onchain_batch(
    tmp: Path, asset: str, versioned: bool, database_url: str | None = None, label: str = ""
) -> dict[str, Any]:
    """Settle 60 payouts for real on LiteSVM and count transfers per landed transaction."""
    kind = f"{'v0' if versioned else 'legacy'}_{asset}{label}"
    section = PaymentsSection(
        state_dir=tmp / kind,
        database_url=database_url,
        asset=asset,  # type: ignore[arg-type]
        default_price={"prompt_per_1k": 10**7, "completion_per_1k": 0},
        batch_max_transfers=256,
        use_versioned_tx=versioned,
    )
    service = await PaymentsService.create(section)
    payer = Keypair()
    await service.faucet(str(payer.pubkey()), 10**11)
    await _deposit(service, payer, 10**11)
    providers = [str(Keypair().pubkey()) for _ in range(60)]
    for i, wallet in enumerate(providers):
        service.place_hold(HoldRequest(f"r{i}", str(payer.pubkey()), "m", max_tokens=1, prompt_tokens=100))
        service.report_usage(UsageReport(f"r{i}", str(payer.pubkey()), "m", 100, 0, (ProviderShare(wallet, 1),)))
        if asset == "spl":  # token accounts exist already: measure transfers, not account creation
            await service.faucet(wallet, 1)
    start = time.perf_counter()
    report = await service.settle()
    elapsed = time.perf_counter() - start
    sizes = sorted((len(b.items) for b in service.book.confirmed_batches()), reverse=True)
    ok = (await service.reconcile()).ok
    await service.close()
    return {
        f"onchain_{kind}_batch_sizes": sizes,
        f"onchain_{kind}_settle_s": round(elapsed, 3),
        f"onchain_{kind}_payouts": report.payouts_confirmed,
        f"onchain_{kind}_payouts_per_s": round(report.payouts_confirmed / elapsed, 1),
        f"onchain_{kind}_reconcile_ok": ok,
    }


async def _deposit(service: PaymentsService, payer: Keypair, amount: int) -> None:
    tx = await deposit_transaction(service, payer, amount)
    await service.deposit(DepositRequest(await service.submit_transaction(tx)))


class _Worker:
    """One payments worker as the actor runs it: its own engine, one DB thread, a group committer."""

    def __init__(self, url: str, group: int) -> None:
        self.ledger = Ledger(make_engine(url), lambda _m: Price(1_000, 2_000), SplitPolicy(500, 100))
        self.db = ThreadPoolExecutor(max_workers=1)
        self.committer = GroupCommitter(self.ledger.record_usage, group, self.db)

    async def request(self, i: int, payer: str, wallets: list[str]) -> None:
        hold = HoldRequest(f"r{i}", payer, "m", max_tokens=256, prompt_tokens=128)
        await asyncio.get_running_loop().run_in_executor(self.db, self.ledger.place_hold, hold)
        shares = (ProviderShare(wallets[i % len(wallets)], 16), ProviderShare(wallets[(i + 1) % len(wallets)], 14))
        await self.committer.submit(UsageReport(f"r{i}", payer, "m", 128, 200, shares))

    def close(self) -> None:
        self.db.shutdown()
        self.ledger.engine.dispose()


async def _drive(url: str, requests: int, gateways: int, workers: int, group: int, providers: int) -> float:
    pool = [_Worker(url, group) for _ in range(workers)]
    payers = [str(Keypair().pubkey()) for _ in range(gateways * 4)]
    wallets = [str(Keypair().pubkey()) for _ in range(providers)]
    for n, payer in enumerate(payers):
        pool[0].ledger.credit_deposit(f"bench-deposit-{n}", payer, 10**15, slot=1)
    turn = itertools.count()

    async def gateway(g: int) -> None:  # each gateway's requests one after another, its calls round-robin
        for i in range(g, requests, gateways):
            await pool[next(turn) % workers].request(i, payers[i % len(payers)], wallets)

    start = time.perf_counter()
    await asyncio.gather(*(gateway(g) for g in range(gateways)))
    elapsed = time.perf_counter() - start
    for worker in pool:
        worker.close()
    return elapsed


def bench_scale_out(url: str, requests: int, gateways: int, workers: int, group: int, providers: int) -> dict[str, Any]:
    """Whole paid requests (hold + usage report) from `gateways` concurrent gateways over `workers` workers."""
    elapsed = asyncio.run(_drive(url, requests, gateways, workers, group, providers))
    return {
        "database": url.split(":", 1)[0].split("+", 1)[0],
        "gateways": gateways,
        "workers": workers,
        "requests": requests,
        "seconds": round(elapsed, 3),
        "records_per_s": round(requests / elapsed, 1),
    }


@contextmanager
def _postgres(spec: str | None) -> Iterator[Any]:
    """`spec` None: no PostgreSQL; a URL: a factory of that database; `auto`: a throwaway cluster's fresh databases."""
    if spec is None:
        yield None
        return
    if spec != "auto":
        yield lambda: spec
        return
    from tests.postgres import PostgresCluster, find_bindir

    bindir = find_bindir()
    if bindir is None:
        raise SystemExit("--postgres auto needs PostgreSQL's binaries (apt-get install postgresql)")
    cluster = PostgresCluster.start(bindir)
    try:
        yield lambda: cluster.url(cluster.create_database("bench"))
    finally:
        cluster.stop()


def scale_out_runs(new_pg: Any, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    """SQLite (one worker: its limit) and PostgreSQL, one gateway and several, records/s and payouts/s."""
    runs = []
    for n, gateways in enumerate((1, args.gateways)):
        url = f"sqlite:///{tmp / f'scale-{n}.sqlite3'}"
        runs.append(bench_scale_out(url, args.requests, gateways, 1, args.group, args.providers))
    out: dict[str, Any] = {}
    if new_pg is not None:
        for gateways, workers in ((1, 1), (args.gateways, 1), (args.gateways, args.workers)):
            runs.append(bench_scale_out(new_pg(), args.requests, gateways, workers, args.group, args.providers))
        out.update(asyncio.run(bench_onchain_batch(tmp, "sol", False, new_pg(), "_postgres")))
    out.update(asyncio.run(bench_onchain_batch(tmp, "sol", False, None, "_sqlite")))
    out["scale_out"] = runs
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20_000, help="settlement records to write")
    parser.add_argument("--group", type=int, default=256, help="records per group commit")
    parser.add_argument("--single-records", type=int, default=500, help="records for the commit-per-record run")
    parser.add_argument("--synchronous", choices=["FULL", "NORMAL"], default="FULL")
    parser.add_argument("--providers", type=int, default=64, help="distinct provider wallets")
    parser.add_argument("--postgres", default=None, help="PostgreSQL URL, or auto (a throwaway cluster)")
    parser.add_argument("--requests", type=int, default=2_000, help="whole requests per scale-out run")
    parser.add_argument("--gateways", type=int, default=8, help="concurrent gateways of the 'several' runs")
    parser.add_argument("--workers", type=int, default=2, help="payments workers of the PostgreSQL run")
    parser.add_argument("--scale-out-only", action="store_true", help="skip the single-ledger and payout-size parts")
    args = parser.parse_args()
    result: dict[str, Any] = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "python": platform.python_version(),
    }
    with tempfile.TemporaryDirectory() as tmp, _postgres(args.postgres) as new_pg:
        if not args.scale_out_only:
            result["ledger_group_commit"] = bench_ledger(args.records, args.group, args.synchronous, args.providers)
            result["ledger_commit_per_record"] = bench_ledger(args.single_records, 1, args.synchronous, args.providers)
            result["payouts_per_tx"] = bench_payouts()
            for asset in ("sol", "spl"):
                for versioned in (False, True):
                    result.update(asyncio.run(bench_onchain_batch(Path(tmp), asset, versioned)))
        result.update(scale_out_runs(new_pg, Path(tmp), args))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
