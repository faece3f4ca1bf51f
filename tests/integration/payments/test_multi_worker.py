"""Two gateway replicas and two payments workers on one PostgreSQL ledger, one worker killed mid-settlement.

A real paid-mode Serve deployment on 127.0.0.1 (tests/integration/attacks/conftest.py `deploy_paid`, tiny Llama,
one stage) with `http.gateway_replicas: 2` and `payments.workers: 2` on the throwaway PostgreSQL cluster; the
chain is LiteSVM, one for both workers (the chain actor). Several wallets send concurrent paid requests through
the Serve proxy (both replicas); then worker 0 settles and is stopped (paused, then `ray.kill`ed) right after it
sent its payout batch, before it recorded the send. The surviving worker takes the settlement lease over once it
expires and finishes: every request charged once, every payee paid once on chain, reconcile clean.
"""

import asyncio
import contextlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray
from ray import serve
from solders.keypair import Keypair
from solders.pubkey import Pubkey
from spl.token.instructions import get_associated_token_address
from sqlalchemy import create_engine, func, select

from cluster.deploy import deploy
from payments.client import PaymentsClient, start_payments_workers
from payments.ledger.schema import payout_batches, settlement_lease, settlement_shares, settlements
from tests.integration.attacks.conftest import DEPOSIT, MODEL, PaidApp, paid_settings

pytestmark = pytest.mark.slow

LEASE_S = 4.0
WALLETS = 3
REQUESTS_PER_WALLET = 4


@dataclass(frozen=True, slots=True)
class PauseAt:
    """Crash hook: the first worker to reach `step` writes `marker` and stops there (its event loop blocked),
    holding the lease and renewing it no more, until the test kills it."""

    step: str
    marker: str
    pause_s: float = 600.0

    def __call__(self, step: str) -> None:
        if step != self.step or os.path.exists(self.marker):
            return
        Path(self.marker).write_text(step)
        time.sleep(self.pause_s)


def _wait_for(path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear in {timeout_s}s")
        time.sleep(0.1)


def _chat(paid: PaidApp, wallet: Any, i: int) -> int:
    response = paid.client(wallet).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": f"count {i}"}], max_tokens=4, temperature=0
    )
    assert response.usage is not None
    return int(response.usage.total_tokens)


def test_two_gateways_two_workers_one_killed_mid_settlement(
    ray_cluster: None, repo_root: Path, model_cache_dir: Path, postgres_url: str, tmp_path: Path
) -> None:
    provider = Keypair()
    marker = tmp_path / "paused"
    app, settings = paid_settings(
        repo_root,
        model_cache_dir,
        tmp_path / "state",
        http={"gateway_replicas": 2},
        workers=2,
        database_url=postgres_url,
        settlement_lease_s=LEASE_S,
        operator_wallet=str(provider.pubkey()),
    )
    section, namespace = settings.payments, settings.ray.namespace
    # Started before the deployment, with the pause hook; the gateway replicas get these same named actors.
    workers = start_payments_workers(section, namespace=namespace, crash_hook=PauseAt("after_send", str(marker)))
    try:
        deploy(app, settings)
        paid = PaidApp(f"http://127.0.0.1:{settings.http.port}/v1", settings)
        replicas = serve.status().applications[settings.http.app_name].deployments["gateway"].replica_states
        assert replicas.get("RUNNING") == 2, replicas
        wallets = [paid.wallet() for _ in range(WALLETS)]
        jobs = [(w, i) for i in range(REQUESTS_PER_WALLET) for w in wallets]
        with ThreadPoolExecutor(len(jobs)) as pool:
            list(pool.map(lambda job: _chat(paid, *job), jobs))

        engine = create_engine(postgres_url)
        with engine.begin() as conn:
            # Every request charged exactly once, and each wallet's balance is its deposit less its charges.
            rows = conn.execute(select(settlements.c.request_id, settlements.c.payer, settlements.c.cost)).all()
            earned = dict(
                conn.execute(
                    select(settlement_shares.c.wallet, func.sum(settlement_shares.c.amount))
                    .where(settlement_shares.c.role.in_(("provider", "proxy")))
                    .group_by(settlement_shares.c.wallet)
                ).all()
            )
        assert len(rows) == len(jobs) and len({r.request_id for r in rows}) == len(jobs)
        for wallet in wallets:
            balance = paid.balance(wallet)
            charged = sum(r.cost for r in rows if r.payer == wallet.address)
            assert balance["held"] == 0 and balance["available"] == DEPOSIT - charged, balance
        assert set(earned) == {str(provider.pubkey())}

        # Worker 0 settles and stops right after sending its batch; then it is killed.
        workers[0].settle.remote()
        _wait_for(marker, 60)
        ray.kill(workers[0])
        survivor = PaymentsClient([workers[1]], 60.0)
        deadline = time.monotonic() + 60
        while True:
            asyncio.run(survivor.settle())
            pending = asyncio.run(survivor.pending())
            if not pending["open_batches"] and not pending["unpaid"]:
                break
            assert time.monotonic() < deadline, pending
            time.sleep(1.0)

        with engine.begin() as conn:
            batches = conn.execute(select(payout_batches.c.state, payout_batches.c.attempt)).all()
            holder = conn.execute(select(settlement_lease.c.holder)).scalar_one()
        engine.dispose()
        # The batch worker 0 sent was resolved by the survivor, not signed or sent again: one batch, one attempt.
        assert [(b.state, b.attempt) for b in batches] == [("confirmed", 1)]
        assert holder == section.worker_actor_name(1)
        chain = ray.get_actor(section.chain_actor_name, namespace=namespace)
        mint = Pubkey.from_string(httpx.get(paid.base_url + "/deposits/info", timeout=30).json()["mint"])
        onchain = ray.get(chain.call.remote("token_amount", get_associated_token_address(provider.pubkey(), mint)))
        assert onchain == earned[str(provider.pubkey())]  # paid once, in full
        report = asyncio.run(survivor.reconcile())
        assert report.ok, report
    finally:
        serve.shutdown()
        for name in (section.worker_actor_name(1), section.chain_actor_name):
            with contextlib.suppress(ValueError):
                ray.kill(ray.get_actor(name, namespace=namespace))
