"""What each dashboard page reads, through what the gateway already holds: its backend (describe), the
provider registry source (`network_nodes`), the payments client and, for training, the MCP server's job
reader (`serve_apps.mcp.http.replica_jobs`) and the training output directory. Each read degrades to an
explanation on the page, never an exception."""

import asyncio
import dataclasses
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from serve_apps.dashboard import views
from serve_apps.dashboard.live import read_pipelines
from serve_apps.gateway.providers import public_nodes

logger = logging.getLogger(__name__)
CALL_TIMEOUT_S = 10.0
SVG_WIDTH = 600


async def network(gateway: Any, detail: bool) -> dict[str, Any]:
    """Providers (registry records) and each pipeline's stages with their layer bars. Without `detail` (the
    operator's view) the records are cut to what `/v1/network/nodes` shows anyone, and stages name no node."""
    providers: list[dict[str, Any]] = []
    wallets: dict[str, str] = {}
    note = None
    if gateway.network_nodes is None:
        note = "This gateway has no provider registry (`/v1/network/nodes` answers 503)."
    else:
        try:
            records = await asyncio.wait_for(gateway.network_nodes(), CALL_TIMEOUT_S)
            wallets = {r.get("node_id"): r.get("wallet", "") for r in records}
            providers = views.provider_rows(public_nodes(records, detail))
        except (LookupError, TimeoutError) as exc:
            note = f"No provider registry is reachable: {exc or 'timed out'}."
    if not providers and note is None:
        note = "The registry lists no provider yet."
    pipelines, errors = await read_pipelines(gateway)
    drawn = []
    for p in pipelines:
        num_layers = p.num_layers or max((s["layers"][1] for s in p.stages), default=1)
        bars = views.layer_bars(p.stages, num_layers, SVG_WIDTH, wallets)
        if not detail:  # node ids are the operator's; the paid wallet of a stage is public
            bars = [dataclasses.replace(b, node_id=None) for b in bars]
        drawn.append({"pipeline": p, "bars": bars})
    return {"providers": providers, "note": note, "pipelines": drawn, "errors": errors, "svg_width": SVG_WIDTH}


async def money(gateway: Any, known_wallets: set[str]) -> dict[str, Any]:
    """The operator's money view: treasury, each wallet's earnings and its pending and paid payouts."""
    payments = gateway.metering.payments
    if payments is None:
        return {"note": "Payments are disabled on this gateway.", "wallets": [], "treasury": None}
    pending = await asyncio.wait_for(payments.pending(), CALL_TIMEOUT_S)
    report = await asyncio.wait_for(payments.reconcile(), CALL_TIMEOUT_S)
    info = await asyncio.wait_for(payments.deposit_info(), CALL_TIMEOUT_S)
    unpaid = dict(pending.get("unpaid") or {})
    providers = [row["wallet"] for row in (await network(gateway, detail=True))["providers"]]
    operator = getattr(gateway.metering, "_operator_wallet", None)
    wallets = views.money_wallets(unpaid, providers, known_wallets, [operator])
    rows = []
    for wallet in wallets:
        lines = [asdict(line) for line in await asyncio.wait_for(payments.payouts(wallet), CALL_TIMEOUT_S)]
        waiting, paid = views.payout_split(lines)
        known_wallets.add(wallet)
        rows.append(
            {
                "wallet": wallet,
                "unpaid": unpaid.get(wallet, 0),
                "pending": waiting,
                "paid": paid,
                "paid_total": sum(int(p["amount"]) for p in paid),
            }
        )
    return {
        "note": None,
        "wallets": rows,
        "treasury": {
            "address": info.treasury,
            "chain": info.chain,
            "mint": info.mint,
            "onchain": report.details.get("treasury_onchain"),
            "liabilities": report.details.get("liabilities"),
            "reconciled": report.ok,
        },
        "open_batches": pending.get("open_batches") or [],
    }


async def me(gateway: Any, wallet: str) -> dict[str, Any]:
    """A signed-in wallet's own balance, keys, payouts and settlements; only ever `wallet`'s."""
    payments = gateway.metering.payments
    balance = await asyncio.wait_for(payments.balance(wallet), CALL_TIMEOUT_S)
    keys = await asyncio.wait_for(payments.list_keys(wallet), CALL_TIMEOUT_S)
    payouts = await asyncio.wait_for(payments.payouts(wallet), CALL_TIMEOUT_S)
    usage = await asyncio.wait_for(payments.usage(wallet), CALL_TIMEOUT_S)  # the ledger's, for this payer only
    return {
        "wallet": wallet,
        "balance": asdict(balance),
        "keys": [asdict(k) for k in keys],
        "payouts": [asdict(p) for p in payouts],
        "settlements": [asdict(line) for line in usage],
    }


async def training(output_dir: Path) -> dict[str, Any]:
    """Jobs from Ray's job server (as the MCP server reads them) and each run's rounds or steps on disk."""
    from serve_apps.mcp.http import replica_jobs
    from serve_apps.mcp.jobs import JobsUnavailable

    jobs: list[dict[str, Any]] = []
    note = None
    try:
        jobs = await asyncio.wait_for(replica_jobs().list_jobs(("train_dp", "train_fl")), CALL_TIMEOUT_S)
    except (JobsUnavailable, TimeoutError) as exc:
        note = f"Ray's job server: {exc or 'timed out'}"
    runs = await asyncio.to_thread(read_runs, output_dir)
    return {"jobs": jobs, "note": note, "runs": runs, "output_dir": str(output_dir)}


def read_runs(output_dir: Path) -> list[dict[str, Any]]:
    """Federated runs (<run>/summary.json) and Ray Train runs (<run>/**/result.json) under output_dir."""
    root = output_dir.expanduser()
    if not root.is_dir():
        return []
    runs: list[dict[str, Any]] = []
    for run in sorted(p for p in root.iterdir() if p.is_dir()):
        summary = run / "summary.json"
        if summary.is_file():
            try:
                rounds = views.fl_rounds(json.loads(summary.read_text()))
            except (OSError, json.JSONDecodeError):
                continue
            runs.append(
                {"name": run.name, "kind": "federated", "rounds": rounds, "rewards": views.rewards_by_wallet(rounds)}
            )
            continue
        steps = _train_steps(run)
        if steps is not None:
            runs.append({"name": run.name, "kind": "data-parallel", "steps": steps})
    return runs


def _train_steps(run: Path) -> list[tuple[int, float]] | None:
    """A Ray Train run's (step, loss): its checkpoint snapshot (Train v2), else a result.json (v1); None when
    the directory is no Ray Train run."""
    snapshots = sorted(run.glob("**/checkpoint_manager_snapshot.json"))
    results = sorted(run.glob("**/result.json"))
    try:
        if snapshots:
            return views.checkpoint_steps(json.loads(snapshots[-1].read_text()))
        if results:
            return views.train_steps(results[-1].read_text().splitlines())
    except (OSError, json.JSONDecodeError):
        return []
    return None
