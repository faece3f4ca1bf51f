"""Payments benchmark: ledger settlement records per second, payouts per on-chain transaction.

    .venv/bin/python bench/payments_bench.py --records 20000 --group 256

Prints one JSON object. Records go through the real ledger (SQLite file, WAL, synchronous=FULL by
default) with holds placed beforehand; payouts are real transactions executed on LiteSVM.
"""

import argparse
import asyncio
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

from solders.keypair import Keypair

from cluster.config.payments import PaymentsSection
from payments.chain.tx import AssetSpec, BudgetSpec, PayoutLine, fit_lines
from payments.deposits import deposit_transaction
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


async def bench_onchain_batch(tmp: Path, asset: str, versioned: bool) -> dict[str, Any]:
    """Settle 60 payouts for real on LiteSVM and count transfers per landed transaction."""
    kind = f"{'v0' if versioned else 'legacy'}_{asset}"
    section = PaymentsSection(
        state_dir=tmp / kind,
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
        f"onchain_{kind}_reconcile_ok": ok,
    }


async def _deposit(service: PaymentsService, payer: Keypair, amount: int) -> None:
    tx = await deposit_transaction(service, payer, amount)
    await service.deposit(DepositRequest(await service.submit_transaction(tx)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20_000, help="settlement records to write")
    parser.add_argument("--group", type=int, default=256, help="records per group commit")
    parser.add_argument("--single-records", type=int, default=500, help="records for the commit-per-record run")
    parser.add_argument("--synchronous", choices=["FULL", "NORMAL"], default="FULL")
    parser.add_argument("--providers", type=int, default=64, help="distinct provider wallets")
    args = parser.parse_args()
    result: dict[str, Any] = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "python": platform.python_version(),
    }
    result["ledger_group_commit"] = bench_ledger(args.records, args.group, args.synchronous, args.providers)
    result["ledger_commit_per_record"] = bench_ledger(args.single_records, 1, args.synchronous, args.providers)
    result["payouts_per_tx"] = bench_payouts()
    with tempfile.TemporaryDirectory() as tmp:
        for asset in ("sol", "spl"):
            for versioned in (False, True):
                result.update(asyncio.run(bench_onchain_batch(Path(tmp), asset, versioned)))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
