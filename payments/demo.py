"""`solanalm demo paid` (`make demo-paid`): one request paid end to end on the embedded chain (LiteSVM).

What it shows, each step through the public API with the Python SDK (`solanalm_client`) unless marked:
a client wallet is created (a Solana CLI keypair file) and funded by the LiteSVM faucet (operator), signs
in (SIWS), deposits (a transfer it signs, relayed by the gateway), asks one question through the `openai`
client, reads its receipt (shares per provider wallet, the network's commission); a settlement pass runs
(operator), and the provider wallet signs in and sees its payout transaction and its balance.

It deploys its own paid-mode application (configs/serve.yaml's builder with a demo price, a fresh ledger and
chain in a temporary state dir, the operator's stages paid to a generated provider wallet), so the open-mode
`make run` default and its ledger are untouched. `run_paid_demo` is the flow itself, over any running
paid gateway; the tests run it against their deployment.
"""

import asyncio
import json
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Protocol

import typer
from rich.console import Console
from rich.table import Table
from solders.keypair import Keypair

app = typer.Typer(help="Demonstrations of the network.", no_args_is_help=True)
console = Console()
DEMO_PRICE = {"prompt_per_1k": 1_000_000, "completion_per_1k": 2_000_000}  # lamports per 1,000 tokens
DEMO_DEPOSIT = 100_000_000  # 0.1 SOL
DEMO_QUESTION = "What is the capital of France?"


class DemoOperator(Protocol):
    """What only the operator can do on the embedded chain: fund a wallet and run a settlement pass."""

    async def faucet(self, wallet: str, amount: int) -> None: ...
    async def settle(self) -> Any: ...


@dataclass(frozen=True)
class DemoReport:
    """Everything the demo saw, for printing and for the tests."""

    client_wallet: str
    keypair_file: Path
    deposit: Any  # solanalm_client.Deposit
    balance_before: Any  # solanalm_client.Balance, after the deposit
    balance_after: Any
    answer: Any  # solanalm_client.InferenceResult
    receipt: Any  # solanalm_client.Receipt, before settlement
    settle_report: Any
    receipt_after: Any
    provider_wallet: str
    provider_earnings_before: Any  # solanalm_client.Earnings
    provider_earnings_after: Any


def write_keypair_file(keypair: Keypair, path: Path) -> Path:
    """The Solana CLI format (a JSON array of the 64 secret+public bytes), readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(list(bytes(keypair))))
    path.chmod(0o600)
    return path


async def run_paid_demo(
    base_url: str,
    operator: DemoOperator,
    provider: Keypair,
    workdir: Path,
    *,
    deposit: int = DEMO_DEPOSIT,
    question: str = DEMO_QUESTION,
    max_tokens: int = 16,
    model: str | None = None,
) -> DemoReport:
    """The paid path against a running paid-mode gateway whose stages pay `provider`'s wallet."""
    from solanalm_client import AsyncSolanaLMClient

    client_keypair = Keypair()
    keypair_file = write_keypair_file(client_keypair, workdir / "client-wallet.json")
    await operator.faucet(str(client_keypair.pubkey()), deposit)
    async with AsyncSolanaLMClient(base_url, model=model) as client, AsyncSolanaLMClient(base_url) as prov:
        await client.sign_in(keypair_file)
        credited = await client.deposit(deposit)
        before = await client.balance()
        answer = await client.inference(question, max_tokens=max_tokens)
        if answer.settlement_id is None:
            raise RuntimeError("the gateway returned no settlement id: is it in paid mode?")
        receipt = await client.receipt(answer.settlement_id)
        after = await client.balance()
        await prov.sign_in(provider)
        earned_before = await prov.earnings()
        settled = await operator.settle()
        receipt_after = await client.receipt(answer.settlement_id)
        earned_after = await prov.earnings()
    return DemoReport(
        str(client_keypair.pubkey()),
        keypair_file,
        credited,
        before,
        after,
        answer,
        receipt,
        settled,
        receipt_after,
        str(provider.pubkey()),
        earned_before,
        earned_after,
    )


def print_report(report: DemoReport, out: Console = console) -> None:
    out.print(f"[bold]client wallet[/] {report.client_wallet} (keypair file {report.keypair_file})")
    out.print(f"[bold]deposit[/] {report.deposit.amount} lamports credited (tx {report.deposit.signature})")
    out.print(f"[bold]answer[/] {report.answer.text!r}")
    out.print(f"[bold]settlement id[/] {report.answer.settlement_id}")
    receipt = report.receipt
    out.print(
        f"[bold]receipt[/] {receipt.prompt_tokens} prompt + {receipt.completion_tokens} completion tokens,"
        f" cost {receipt.cost} (balance {report.balance_before.available} -> {report.balance_after.available})"
    )
    table = Table("wallet", "role", "layers", "amount")
    for share in receipt.shares:
        table.add_row(share.wallet, share.role, str(share.layers_served), str(share.amount))
    out.print(table)
    out.print(f"[bold]network commission[/] {receipt.commission}")
    out.print(f"[bold]settlement pass[/] {report.settle_report}")
    for line in report.provider_earnings_after.payouts:
        out.print(f"[bold]payout[/] {line.amount} to {line.wallet}: {line.state}, transaction {line.signature}")
    before, after = report.provider_earnings_before, report.provider_earnings_after
    out.print(
        f"[bold]provider balance[/] {report.provider_wallet}: unpaid {before.unpaid} -> {after.unpaid},"
        f" paid on chain {before.paid} -> {after.paid}"
    )
    out.print(f"[bold]receipt settled[/] {report.receipt_after.settled} {list(report.receipt_after.signatures)}")


def demo_overrides(state_dir: Path, provider_wallet: str, port: int | None) -> dict[str, dict[str, Any]]:
    """Paid mode over configs/serve.yaml: a price, sign-in required, a fresh ledger, the stages paying
    `provider_wallet`, settlement only when the demo asks."""
    return {
        "http": {"port": port},
        "payments": {
            "enabled": True,
            "open_mode": False,
            "siws_allow_local_domain": True,  # the demo gateway listens on 127.0.0.1 only
            "chain_backend": "litesvm",
            "state_dir": str(state_dir),
            "actor_name": f"solanalm-payments-demo-{uuid.uuid4().hex[:6]}",
            "default_price": DEMO_PRICE,
            "operator_wallet": provider_wallet,
            "settle_interval_s": 3600,
        },
    }


@app.callback()
def _demo() -> None:
    """Demonstrations of the network."""


@app.command()
def paid(
    config: Annotated[Path, typer.Option(help="Serve config (its builder and model).")] = Path("configs/serve.yaml"),
    port: Annotated[int | None, typer.Option(help="HTTP port of the demo gateway.")] = None,
    stages: Annotated[int, typer.Option(min=1, help="Pipeline stages.")] = 1,
    model: Annotated[str | None, typer.Option(help="Catalogue name to serve (default: the config's).")] = None,
) -> None:
    """Deploy a paid-mode gateway on LiteSVM, pay for one request end to end, show receipt and payout, stop."""
    from cluster import cli as cluster_cli
    from cluster.deploy import read_serve_config, settings_for
    from payments.client import get_payments_client

    try:
        import solanalm_client  # noqa: F401
    except ImportError:
        console.print("[red]error:[/] the SDK is not installed: pip install -e client (make install does)")
        raise typer.Exit(1) from None
    workdir = Path(tempfile.mkdtemp(prefix="solanalm-paid-demo-"))
    provider = Keypair()
    write_keypair_file(provider, workdir / "provider-wallet.json")
    serve_app = read_serve_config(config)
    overrides = demo_overrides(workdir / "payments", str(provider.pubkey()), port)
    overrides |= {"pipeline": {"num_stages": stages}, "model": {"served": [model] if model else None}}
    settings = settings_for(serve_app, overrides)
    serving = cluster_cli.start_serving(serve_app, settings)
    try:
        settings = serving.settings
        base_url = f"{settings.http.scheme}://{settings.http.host}:{settings.http.port}/v1"
        console.print(f"[green]paid demo gateway[/] {base_url} (state in {workdir})")
        operator = get_payments_client(settings.payments, namespace=settings.ray.namespace)
        report = asyncio.run(run_paid_demo(base_url, operator, provider, workdir))
        print_report(report)
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback; the app and head are still stopped
        console.print(f"[red]error:[/] the paid demo failed: {type(exc).__name__}: {exc}")
        raise typer.Exit(1) from None
    finally:
        cluster_cli.stop_serving(serving)


if __name__ == "__main__":
    app()
