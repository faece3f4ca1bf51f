"""Fixtures of the payments unit tests: a real PaymentsService on SQLite + in-process LiteSVM.

The ledger database comes from one fixture, `ledger_database_url`: None (SQLite: in memory for a bare
ledger, a file in the state dir for a service) unless `SOLANALM_TEST_POSTGRES` names a running PostgreSQL
cluster (tests/postgres.py), in which case each test gets a fresh database on it.
tests/integration/ledger/test_payments_suite_on_postgres.py re-runs this directory that way.
"""

import asyncio
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from solders.keypair import Keypair
from solders.message import Message
from solders.pubkey import Pubkey
from solders.system_program import TransferParams, transfer
from solders.transaction import Transaction, VersionedTransaction
from spl.token.constants import TOKEN_PROGRAM_ID
from spl.token.instructions import get_associated_token_address, transfer_checked
from spl.token.models import TransferCheckedParams
from sqlalchemy import Engine, create_engine

from cluster.config.payments import PaymentsSection
from payments.ledger.ledger import make_engine
from payments.protocol import DepositRequest, HoldRequest, ProviderShare, UsageReport
from payments.service import PaymentsService
from tests.postgres import cluster_from_environment
from tests.unit.payments.forked import is_under, run_forked


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def pytest_report_header(config: pytest.Config) -> str:
    cluster = cluster_from_environment()
    return f"payments ledger: {'PostgreSQL at ' + cluster.socket_dir if cluster else 'SQLite'}"


@pytest.fixture
def ledger_database_url() -> Iterator[str | None]:
    """None: SQLite. Else the URL of a fresh PostgreSQL database, dropped after the test."""
    cluster = cluster_from_environment()
    if cluster is None:
        yield None
        return
    name = cluster.create_database("unit")
    try:
        yield cluster.url(name)
    finally:
        cluster.drop_database(name)


@pytest.fixture
def ledger_engine(ledger_database_url: str | None) -> Iterator[Engine]:
    """The engine of a bare ledger: SQLite in memory, or the test's PostgreSQL database."""
    engine = create_engine("sqlite://") if ledger_database_url is None else make_engine(ledger_database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def section(tmp_path: Path, ledger_database_url: str | None) -> PaymentsSection:
    return PaymentsSection(state_dir=tmp_path / "state", siws_domain="solanalm.test", database_url=ledger_database_url)


def point_cli_at(section: PaymentsSection, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `solanalm payments ...` (settings from the environment) open the test's ledger."""
    monkeypatch.setenv("SOLANALM_PAYMENTS__STATE_DIR", str(section.state_dir))
    if section.database_url is not None:
        monkeypatch.setenv("SOLANALM_PAYMENTS__DATABASE_URL", section.database_url.get_secret_value())


@pytest.fixture
def make_service(section: PaymentsSection) -> Callable[..., PaymentsService]:
    """Build a service over the test's state dir (call again to simulate a restart)."""
    opened: list[PaymentsService] = []

    def factory(**kwargs: Any) -> PaymentsService:
        cfg = PaymentsSection.model_validate({**section.model_dump(), **kwargs.pop("section", {})})
        service = run(PaymentsService.create(cfg, **kwargs))
        opened.append(service)
        return service

    yield factory  # type: ignore[misc]
    for service in opened:
        service.ledger.engine.dispose()


def deposit_tx(service: PaymentsService, payer: Keypair, amount: int, to: Pubkey | None = None) -> VersionedTransaction:
    """A client-signed transfer of `amount` to the treasury (or to `to`)."""
    treasury = to or service.treasury.pubkey()
    if service.asset.mint is None:
        ix = transfer(TransferParams(from_pubkey=payer.pubkey(), to_pubkey=treasury, lamports=amount))
    else:
        ix = transfer_checked(
            TransferCheckedParams(
                program_id=TOKEN_PROGRAM_ID,
                source=get_associated_token_address(payer.pubkey(), service.asset.mint),
                mint=service.asset.mint,
                dest=get_associated_token_address(treasury, service.asset.mint),
                owner=payer.pubkey(),
                amount=amount,
                decimals=service.asset.decimals,
            )
        )
    blockhash = service.chain.svm.latest_blockhash()  # type: ignore[attr-defined]
    tx = Transaction([payer], Message.new_with_blockhash([ix], payer.pubkey(), blockhash), blockhash)
    return VersionedTransaction.from_legacy(tx)


def funded_client(service: PaymentsService, amount: int) -> Keypair:
    """A wallet that deposited `amount` into its balance through a real on-chain transfer."""
    payer = Keypair()
    run(service.faucet(str(payer.pubkey()), amount))
    signature = run(service.submit_transaction(bytes(deposit_tx(service, payer, amount))))
    deposit = run(service.deposit(DepositRequest(signature)))
    assert deposit.amount == amount and deposit.newly_credited
    return payer


def serve_request(
    service: PaymentsService,
    request_id: str,
    payer: str,
    providers: list[tuple[str, int]],
    prompt: int = 100,
    completion: int = 200,
    max_tokens: int = 256,
    model: str = "m",
    proxy: str | None = None,
) -> Any:
    service.place_hold(HoldRequest(request_id, payer, model, max_tokens=max_tokens, prompt_tokens=prompt))
    return service.report_usage(
        UsageReport(
            request_id,
            payer,
            model,
            prompt,
            completion,
            tuple(ProviderShare(w, n) for w, n in providers),
            proxy_wallet=proxy,
        )
    )


def onchain_amount(service: PaymentsService, wallet: str) -> int:
    """What `wallet` holds on chain in the settlement asset."""
    pubkey = Pubkey.from_string(wallet)
    if service.asset.mint is None:
        return run(service.chain.lamports(pubkey))
    return run(service.chain.token_amount(get_associated_token_address(pubkey, service.asset.mint))) or 0


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
    """Payments unit tests run LiteSVM: fork them (see tests/unit/payments/forked.py)."""
    if not hasattr(os, "fork") or not is_under(item, Path(__file__).resolve().parent):
        return None
    return run_forked(item)
