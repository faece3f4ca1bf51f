"""The money path under attack: one real paid-mode deployment (Ray Serve gateway, payments actor on
LiteSVM, tiny Llama through 1 stage) on 127.0.0.1, shared by the attack tests of this package.

`paid.wallet()` gives a signed-in, funded client: a fresh keypair signs the SIWS challenge over HTTP,
the embedded faucet funds it, and a deposit is relayed and credited over HTTP, as a real client does.
"""

import asyncio
import base64
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from ray import serve
from solders.hash import Hash
from solders.keypair import Keypair
from solders.message import Message
from solders.pubkey import Pubkey
from solders.transaction import Transaction

from cluster.config import Settings
from cluster.deploy import deploy, read_serve_config, settings_for
from payments.chain.tx import AssetSpec
from payments.client import PaymentsClient, get_payments_client
from payments.deposits import deposit_instruction

MODEL = "tiny-llama"
PROMPT_PER_1K = 1_000_000  # 1,000 base units per prompt token: charges are large enough to read
COMPLETION_PER_1K = 2_000_000  # 2,000 per completion token
DEPOSIT = 50_000_000


@dataclass(frozen=True)
class Wallet:
    keypair: Keypair
    api_key: str

    @property
    def address(self) -> str:
        return str(self.keypair.pubkey())

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}


@dataclass(frozen=True)
class PaidApp:
    base_url: str  # http://127.0.0.1:PORT/v1
    settings: Settings

    def payments(self) -> PaymentsClient:
        """The payments actor, as the gateway reaches it (faucet, settle, reconcile)."""
        return get_payments_client(self.settings.payments, namespace=self.settings.ray.namespace)

    def client(self, wallet: Wallet) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=wallet.api_key, max_retries=0, timeout=120)

    def sign_in(self, keypair: Keypair) -> str:
        """SIWS over HTTP: challenge, sign the exact message, verify; returns the API key."""
        challenge = httpx.post(self.base_url + "/auth/challenge", json={"wallet": str(keypair.pubkey())}, timeout=30)
        challenge.raise_for_status()
        message = challenge.json()["message"]
        signature = str(keypair.sign_message(message.encode()))
        verified = httpx.post(
            self.base_url + "/auth/verify", json={"message": message, "signature": signature}, timeout=30
        )
        verified.raise_for_status()
        return str(verified.json()["api_key"])

    def wallet(self, deposit: int = DEPOSIT) -> Wallet:
        """A fresh keypair, signed in, funded by the faucet and with `deposit` credited over HTTP."""
        keypair = Keypair()
        wallet = Wallet(keypair, self.sign_in(keypair))
        if deposit:
            self.deposit(wallet, deposit)
        return wallet

    def deposit(self, wallet: Wallet, amount: int) -> dict[str, Any]:
        info = httpx.get(self.base_url + "/deposits/info", timeout=30).json()
        asyncio.run(self.payments().faucet(wallet.address, amount))
        asset = AssetSpec(Pubkey.from_string(info["mint"]) if info["mint"] else None, info["decimals"])
        ix = deposit_instruction(wallet.keypair.pubkey(), Pubkey.from_string(info["treasury"]), asset, amount)
        blockhash = Hash.from_string(info["blockhash"])
        tx = Transaction(
            [wallet.keypair], Message.new_with_blockhash([ix], wallet.keypair.pubkey(), blockhash), blockhash
        )
        response = httpx.post(
            self.base_url + "/deposits",
            json={"transaction": base64.b64encode(bytes(tx)).decode()},
            headers=wallet.headers,
            timeout=60,
        )
        response.raise_for_status()
        return dict(response.json())

    def balance(self, wallet: Wallet) -> dict[str, Any]:
        response = httpx.get(self.base_url + "/balance", headers=wallet.headers, timeout=30)
        response.raise_for_status()
        return dict(response.json())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def deploy_paid(
    repo_root: Path, model_cache_dir: Path, state_dir: Path, http: dict[str, Any] | None = None, **payments: Any
) -> PaidApp:
    """configs/serve.yaml's builder in paid mode (prices, sign-in required), tiny Llama, one stage, its
    ledger in `state_dir`; `payments` adds or overrides payments settings (e.g. operator_wallet), `http` http
    settings (e.g. gateway_replicas)."""
    app, settings = paid_settings(repo_root, model_cache_dir, state_dir, http, **payments)
    deploy(app, settings)
    return PaidApp(f"http://127.0.0.1:{settings.http.port}/v1", settings)


def paid_settings(
    repo_root: Path, model_cache_dir: Path, state_dir: Path, http: dict[str, Any] | None = None, **payments: Any
) -> tuple[Any, Settings]:
    """The serve config and settings `deploy_paid` deploys (to start something before the deployment)."""
    app = read_serve_config(repo_root / "configs" / "serve.yaml")
    settings = settings_for(
        app,
        {
            "model": {
                "served": [MODEL],
                "cache_dir": str(model_cache_dir),
                "catalogue": str(repo_root / "configs" / "models.yaml"),
            },
            "pipeline": {"num_stages": 1, "max_num_seqs": 8, "max_queue": 32},
            "http": {"port": _free_port(), "rate_limits": RATE_LIMITS, **(http or {})},
            "payments": {
                "enabled": True,
                "open_mode": False,
                "siws_allow_local_domain": True,  # a local test deployment: the default localhost domain
                "state_dir": str(state_dir),
                "actor_name": f"solanalm-payments-{state_dir.name}-{uuid.uuid4().hex[:6]}",
                "default_price": {"prompt_per_1k": PROMPT_PER_1K, "completion_per_1k": COMPLETION_PER_1K},
                "settle_interval_s": 3600,  # tests settle explicitly
                **payments,
            },
        },
    )
    return app, settings


# Package scope: the replica and the payments actor are released before other packages' tests run.
@pytest.fixture(scope="package")
def paid(
    ray_cluster: None, repo_root: Path, model_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PaidApp]:
    """The money-path deployment the attack tests share."""
    yield deploy_paid(repo_root, model_cache_dir, tmp_path_factory.mktemp("paid-payments"))
    serve.shutdown()


# The deployment's rate limits (http.rate_limits), as requests per window: roomy for the other attack
# tests' traffic from 127.0.0.1, small enough for test_auth_and_limits.py to fill a bucket of its own.
RATE_LIMITS: dict[str, dict[str, int]] = {
    "per_address": {"requests": 500, "window_s": 10},
    "per_wallet": {"requests": 50, "window_s": 30},
    "auth": {"requests": 200, "window_s": 30},
    "deposits": {"requests": 200, "window_s": 30},
    "health": {"requests": 50, "window_s": 30},
}
