"""`solanalm payments ...`: balance, deposit, pending, settle, reconcile, sweep-holds, export, migrate,
backup, restore.

By default a command opens the ledger and the chain backend directly (`--local`). While a payments
actor is running with the in-process LiteSVM backend, use `--via-actor` instead: LiteSVM's state
lives in the actor and two writers would diverge.
"""

import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from solders.keypair import Keypair
from solders.transaction import VersionedTransaction

from cluster.config import load_settings
from payments.chain.litesvm_backend import LiteSVMBackend
from payments.deposits import deposit_transaction
from payments.errors import PaymentError
from payments.forwarding import ServiceForwarder
from payments.ledger import backup as backups
from payments.ledger import migrate as migrations
from payments.ledger.ledger import Ledger, SplitPolicy, make_engine
from payments.ledger.payouts import PayoutBook
from payments.pricing import Price
from payments.protocol import DepositRequest
from payments.service import PaymentsService

app = typer.Typer(help="Payments: balances, deposits, settlement and the ledger.", no_args_is_help=True)
console = Console()
T = TypeVar("T")

ConfigOpt = typer.Option(None, "--config", "-c", help="Settings YAML (sections); env SOLANALM_* overrides.")
ActorOpt = typer.Option(False, "--via-actor", help="Go through the running payments actor (Ray).")


def _with_service(config: Path | None, via_actor: bool, fn: Callable[[Any], Awaitable[T]]) -> T:
    settings = load_settings(config)
    section = settings.payments

    async def local() -> T:
        service = await PaymentsService.create(section)
        try:
            return await fn(_Local(service))
        finally:
            await service.close()

    async def remote() -> T:
        import ray

        from cluster.ray_cluster import prepare_driver
        from payments.client import get_payments_client

        prepare_driver(settings.ray, settings.model.cache_dir / "state")  # the locked cluster's token
        ray.init(
            address=settings.ray.address or "auto",
            namespace=settings.ray.namespace,
            log_to_driver=False,
            configure_logging=False,
        )
        return await fn(get_payments_client(section))

    try:
        return asyncio.run(remote() if via_actor else local())
    except PaymentError as exc:
        console.print(f"[red]error[/red] ({exc.code}): {exc.message}")
        raise typer.Exit(2) from exc


class _Local(ServiceForwarder):
    """PaymentsAPI over a local service, forwarded by name, but for the two calls the CLI does its own way."""

    async def submit_transaction(self, raw: bytes) -> str:
        """The CLI's own transfer: relayed on LiteSVM, sent directly to a real cluster (no relay there)."""
        if isinstance(self.service.chain, LiteSVMBackend):
            return await self.service.submit_transaction(raw)
        await self.service.chain.send_raw(raw)
        return str(VersionedTransaction.from_bytes(raw).signatures[0])

    async def reconcile(self) -> Any:
        await self.service.recover()
        return await self.service.reconcile()


@app.command()
def balance(wallet: str, config: Path | None = ConfigOpt, via_actor: bool = ActorOpt) -> None:
    """Show a wallet's available, held and unpaid amounts (base units)."""
    result = _with_service(config, via_actor, lambda api: api.balance(wallet))
    table = Table("wallet", "available", "held", "unpaid earnings", "asset")
    table.add_row(
        result.wallet,
        str(result.available),
        str(result.held),
        str(result.unpaid_earnings),
        result.asset,
    )
    console.print(table)


@app.command()
def deposit(
    signature: str | None = typer.Option(None, help="Credit an already landed transfer to the treasury."),
    keypair: Annotated[Path | None, typer.Option(help="Solana CLI keypair that pays (with --amount).")] = None,
    amount: int = typer.Option(0, min=0, help="Base units to transfer to the treasury."),
    config: Path | None = ConfigOpt,
    via_actor: bool = ActorOpt,
) -> None:
    """Credit a deposit: give --signature, or --keypair and --amount to send the transfer first."""
    if (signature is None) == (keypair is None):
        console.print("[red]give exactly one of --signature or --keypair/--amount[/red]")
        raise typer.Exit(2)

    async def run(api: Any) -> Any:
        sig = signature
        if keypair is not None:
            if not isinstance(api, _Local):
                raise PaymentError("--keypair needs --local (the transfer is built from the local settings)")
            sig = await api.submit_transaction(await _transfer_bytes(api.service, keypair, amount))
        return await api.deposit(DepositRequest(sig or ""))

    result = _with_service(config, via_actor, run)
    state = "credited" if result.newly_credited else "already credited"
    console.print(f"{state}: {result.amount} to {result.wallet} ({result.signature})")


async def _transfer_bytes(service: PaymentsService, keypair_path: Path, amount: int) -> bytes:
    if amount <= 0:
        raise PaymentError("--amount must be > 0")
    payer = Keypair.from_bytes(bytes(json.loads(keypair_path.read_text())))
    return await deposit_transaction(service, payer, amount)


@app.command()
def pending(config: Path | None = ConfigOpt, via_actor: bool = ActorOpt) -> None:
    """Unpaid earnings per wallet and batches not yet confirmed."""
    result = _with_service(config, via_actor, lambda api: api.pending())
    table = Table("wallet", "unpaid", title="unpaid earnings")
    for wallet, amount in sorted(result["unpaid"].items()):
        table.add_row(wallet, str(amount))
    console.print(table)
    batches = Table("batch", "state", "signature", title="open batches")
    for batch_id, state, sig in result["open_batches"]:
        batches.add_row(batch_id, state, sig or "-")
    console.print(batches)
    quarantined = result.get("quarantined") or []
    if quarantined:
        table = Table("wallet", "unpaid", "failures", "retry at (UTC)", "batch", "reason", title="quarantined payees")
        for q in quarantined:
            retry = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(q["retry_at"]))
            table.add_row(q["wallet"], str(q["unpaid"]), str(q["failures"]), retry, q["batch_id"] or "-", q["reason"])
        console.print(table)
        console.print("a transfer to these payees failed on chain; `solanalm payments unquarantine WALLET` retries one")


@app.command()
def unquarantine(wallet: str, config: Path | None = ConfigOpt) -> None:
    """Retry a quarantined payee in the next settle pass (ledger only: safe beside a running actor)."""
    section = load_settings(config).payments
    engine = make_engine(section.resolved_database_url(), section.sqlite_synchronous)
    ledger = Ledger(engine, _no_price, SplitPolicy(0, 0))
    try:
        released = PayoutBook(ledger, fees_in_ledger=section.asset == "sol").release_quarantine(wallet)
    finally:
        ledger.engine.dispose()
    if not released:
        console.print(f"[red]{wallet} is not quarantined[/red]")
        raise typer.Exit(1)
    console.print(f"{wallet} will be retried in the next settle pass")


def _no_price(model: str) -> Price:
    raise PaymentError("no pricing in a ledger-only command")


@app.command()
def settle(config: Path | None = ConfigOpt, via_actor: bool = ActorOpt) -> None:
    """Run one settlement pass: finish open batches, batch and pay what is payable."""
    report = _with_service(config, via_actor, lambda api: api.settle())
    console.print(
        f"confirmed {report.batches_confirmed} batches, {report.payouts_confirmed} payouts, "
        f"{report.amount_paid} paid; {report.pending_batches} pending, "
        f"{report.held_wallets} wallets held (below minimum or rent exemption)"
    )


@app.command()
def reconcile(config: Path | None = ConfigOpt, via_actor: bool = ActorOpt) -> None:
    """Finish open batches against the chain, then check the ledger (exit 1 if a check fails)."""
    report = _with_service(config, via_actor, lambda api: api.reconcile())
    table = Table("check", "result")
    for name, ok in report.checks.items():
        table.add_row(name, "[green]ok[/green]" if ok else "[red]FAILED[/red]")
    console.print(table)
    figures = Table("figure", "base units")
    for name, value in report.details.items():
        figures.add_row(name, str(value))
    console.print(figures)
    if not report.ok:
        raise typer.Exit(1)


@app.command("sweep-holds")
def sweep_holds(
    max_age_s: float | None = typer.Option(None, min=0, help="Release holds older than this; default hold_max_age_s."),
    config: Path | None = ConfigOpt,
    via_actor: bool = ActorOpt,
) -> None:
    """Release orphaned holds (open longer than any request lives) back to their payers."""
    result = _with_service(config, via_actor, lambda api: api.sweep_holds(max_age_s))
    console.print(f"released {len(result.request_ids)} holds, {result.amount} base units")
    for request_id in result.request_ids:
        console.print(f"  {request_id}")


@app.command("fund-rewards")
def fund_rewards(
    amount: int = typer.Option(..., min=1, help="Base units set aside for federated-training rewards."),
    ref: str = typer.Option(..., help="Your reference for this funding (a second call with it does nothing)."),
    config: Path | None = ConfigOpt,
    via_actor: bool = ActorOpt,
) -> None:
    """Set money aside for training rewards: reward batches beyond what the rewards account holds are refused.
    Send the same amount to the treasury on chain; `reconcile` checks the treasury covers what is owed."""
    held = _with_service(config, via_actor, lambda api: api.fund_training_rewards(ref, amount))
    console.print(f"rewards account holds {held} base units")


@app.command()
def export(
    out: Annotated[Path | None, typer.Option("--out", "-o", help="CSV file (default: stdout).")] = None,
    config: Path | None = ConfigOpt,
) -> None:
    """Export every settlement share as CSV (local ledger)."""

    async def run(api: _Local) -> int:
        if out is None:
            return api.service.export_csv(sys.stdout)
        with open(out, "w", newline="") as fh:
            return api.service.export_csv(fh)

    rows = _with_service(config, False, run)  # type: ignore[arg-type]
    if out is not None:
        console.print(f"wrote {rows} rows to {out}")


@app.command()
def migrate(
    sql: bool = typer.Option(False, "--sql", help="Print the SQL instead of running it (offline, for review)."),
    from_revision: str | None = typer.Option(
        None, "--from", help="With --sql: the revision the ledger is at (default: an empty database)."
    ),
    config: Path | None = ConfigOpt,
) -> None:
    """Upgrade the ledger's schema to the newest migration (alembic upgrade head); safe on a live ledger."""
    section = load_settings(config).payments
    url = section.resolved_database_url()
    if sql:
        typer.echo(migrations.upgrade_sql(url, from_revision=from_revision), nl=False)
        return
    section.state_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(url, section.sqlite_synchronous)
    try:
        result = migrations.migrate(engine)
    finally:
        engine.dispose()
    origin = "pre-Alembic (stamped 0001)" if result.adopted else result.from_revision or "empty"
    console.print(f"ledger schema {origin} -> {result.to_revision} (head {migrations.head_revision()})")
    if result.added_columns:
        console.print(f"  added {', '.join(result.added_columns)}")
    if not result.changed:
        console.print("  already at head: nothing to do")


ForceOpt = typer.Option(False, "--force", help="Overwrite what is there.")


def _print_backup(result: backups.BackupResult) -> None:
    verb = "backed up" if result.action == "backup" else "restored"
    into = "to" if result.action == "backup" else "from"
    console.print(f"{verb} {result.database} {into} {result.path} ({result.size_bytes} bytes, {result.method})")


@app.command()
def backup(path: Path, force: bool = ForceOpt, config: Path | None = ConfigOpt) -> None:
    """Back the ledger up to PATH (SQLite online backup, or pg_dump -Fc); safe while the ledger is written."""
    section = load_settings(config).payments
    try:
        _print_backup(backups.backup(section.resolved_database_url(), path, force))
    except PaymentError as exc:
        console.print(f"[red]error[/red] ({exc.code}): {exc.message}")
        raise typer.Exit(2) from exc


@app.command()
def restore(path: Path, force: bool = ForceOpt, config: Path | None = ConfigOpt) -> None:
    """Replace the ledger with the backup at PATH (stop the payments actor first), then migrate it to head.
    Run `reconcile` next: it finds the payouts made since the backup on chain, so none is paid twice."""
    section = load_settings(config).payments
    url = section.resolved_database_url()
    try:
        _print_backup(backups.restore(url, path, force))
    except PaymentError as exc:
        console.print(f"[red]error[/red] ({exc.code}): {exc.message}")
        raise typer.Exit(2) from exc
    engine = make_engine(url, section.sqlite_synchronous)
    try:
        result = migrations.migrate(engine)  # a backup from an older release gets the newer schema
    finally:
        engine.dispose()
    console.print(f"ledger schema {result.from_revision or 'pre-Alembic'} -> {result.to_revision}")
    console.print("next: solanalm payments reconcile (finds payouts made after the backup on chain)")
