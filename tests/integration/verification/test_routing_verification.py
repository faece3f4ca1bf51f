"""Reputation routing and spot-check verification on a real cluster: two provider Ray nodes on this
machine join with their own wallets (real `join()`: `ray start --address ... --labels ... --block`), each
hosts one replica (one stage, to keep the test short; tests/unit/verification pins a faulty stage among
three) of tiny-llama; the replica on the "bad" provider has its stage's weights
perturbed (pipeline.fault_injection, the test/chaos tool). With every request spot-checked:

(a) a request the bad pipeline served is caught and pinned on the bad provider's node,
(b) that node's reputation drops and the router sends the following requests to the good replica,
(c) the bad provider's payout for that request is withheld in the ledger; the good one's is untouched.
"""

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import openai
import pytest
import ray
from ray import serve
from solders.hash import Hash
from solders.keypair import Keypair
from solders.message import Message
from solders.pubkey import Pubkey
from solders.transaction import Transaction

from cluster.config import Settings
from cluster.deploy import deploy, read_serve_config, settings_for
from cluster.network import join as joining
from cluster.network.records import NodeCapabilities, NodeRecord
from cluster.network.registry import call_registry, get_or_create_registry
from cluster.network.wallet import write_keypair
from payments.chain.tx import AssetSpec
from payments.client import PaymentsClient, start_payments_actor
from payments.deposits import deposit_instruction
from payments.protocol import DepositRequest, ReceiptQuery, SettlementRecord, SignIn

pytestmark = pytest.mark.slow
NAMESPACE = "solanalm"  # the settings' ray.namespace: where the gateway and replicas look up named actors
SLOT = "slm_verify_slot"  # custom resource: only the two provider nodes have it, one replica's worth each
STAGES = 1  # per replica
TIMEOUT_S = 60
T = TypeVar("T")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(check: Callable[[], T | None], timeout_s: float, what: str, poll_s: float = 0.5) -> T:
    deadline = time.monotonic() + timeout_s
    while (value := check()) is None or value is False:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(poll_s)
    return value


class Providers:
    """Provider Ray nodes started by the real `join()`, each `ray start --block` in its own process group."""

    def __init__(self, settings: Settings, tmp: Path) -> None:
        self.settings, self.tmp = settings, tmp
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.records: dict[str, NodeRecord] = {}
        self.temp_dirs: list[str] = []

    def join(self, name: str) -> NodeRecord:
        keypair_path = write_keypair(Keypair(), self.tmp / f"{name}.json")

        def start(command: list[str]) -> None:
            temp_dir = tempfile.mkdtemp(prefix="slv-", dir="/tmp")  # short: socket paths
            self.temp_dirs.append(temp_dir)
            command = [*command, f"--resources={json.dumps({SLOT: STAGES})}", f"--temp-dir={temp_dir}"]
            self.processes[name] = subprocess.Popen(
                command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
            )

        _, record = joining.join(
            ray.get_runtime_context().gcs_address,
            keypair_path,
            self.settings.network,
            NAMESPACE,
            region=name,
            num_cpus=2,
            capabilities=NodeCapabilities(throughput_gflops=10.0),
            runner=start,
            block=True,
        )
        self.records[name] = record
        return record

    def stop_all(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=TIMEOUT_S)
        for temp_dir in self.temp_dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)


@dataclass
class Cluster:
    providers: Providers
    registry: Any
    payments: PaymentsClient
    client: openai.OpenAI
    payer: str

    def node(self, name: str) -> NodeRecord:
        records = call_registry(self.registry, "list_nodes", False, timeout_s=TIMEOUT_S)
        return next(r for r in records if r.node_id == self.providers.records[name].node_id)

    def wallet(self, name: str) -> str:
        return self.providers.records[name].wallet

    def complete(self, prompt: str) -> SettlementRecord:
        """One real request; its settlement record says which provider wallets served it."""
        # Long enough that two requests sent at once are both in flight when the second is routed (with 4
        # tokens the first could finish first on the direct links, and both went to the same replica).
        response = self.client.completions.with_raw_response.create(
            model="tiny-llama", prompt=prompt, max_tokens=32, temperature=0.0, extra_body={"ignore_eos": True}
        )
        settlement_id = response.headers["x-solanalm-settlement-id"]
        return asyncio.run(self.payments.get_receipt(ReceiptQuery(settlement_id, self.payer))).record

    def receipt(self, settlement_id: str) -> SettlementRecord:
        return asyncio.run(self.payments.get_receipt(ReceiptQuery(settlement_id, self.payer))).record


async def api_key_with_balance(client: PaymentsClient, payer: Keypair, amount: int) -> str:
    """Fund the payer on LiteSVM, deposit the SPL asset to the treasury, sign in (SIWS): an API key that pays."""
    info = await client.deposit_info()
    if info.mint is None:
        raise ValueError("the test payments settle in an SPL token on LiteSVM")
    await client.faucet(str(payer.pubkey()), amount)
    asset = AssetSpec(Pubkey.from_string(info.mint), info.decimals)
    ix = deposit_instruction(payer.pubkey(), Pubkey.from_string(info.treasury), asset, amount)
    blockhash = Hash.from_string(info.blockhash)
    message = Message.new_with_blockhash([ix], payer.pubkey(), blockhash)
    signature = await client.submit_transaction(bytes(Transaction([payer], message, blockhash)))
    assert (await client.deposit(DepositRequest(signature))).amount == amount
    challenge = await client.challenge(str(payer.pubkey()))
    key = await client.verify(SignIn(challenge.message, str(payer.sign_message(challenge.message.encode()))))
    return key.secret


@pytest.fixture(scope="module")
def cluster(
    ray_cluster: None, repo_root: Path, model_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    tag = uuid.uuid4().hex[:8]
    app = read_serve_config(repo_root / "configs" / "serve.yaml")
    network = {
        "registry_name": f"solanalm-registry-{tag}",
        "persist_interval_s": 0,
        "join_timeout_s": TIMEOUT_S,
        "verification_fraction": 1.0,
        "routing": {"stats_period_s": 0.5},
    }
    base: dict[str, dict[str, Any]] = {
        "model": {
            "served": ["tiny-llama"],
            "cache_dir": str(model_cache_dir),
            "catalogue": str(repo_root / "configs" / "models.yaml"),
        },
        "http": {"port": _free_port()},
        "network": network,
        "payments": {
            "enabled": True,
            "open_mode": False,
            "state_dir": str(tmp_path_factory.mktemp("payments")),
            "actor_name": f"solanalm-payments-{tag}",
            "settle_interval_s": 3600,
        },
    }
    settings = settings_for(app, base)
    registry = get_or_create_registry(settings.network, NAMESPACE)
    providers = Providers(settings, tmp_path_factory.mktemp("wallets"))
    payer, actors = Keypair(), [registry]
    try:
        with ThreadPoolExecutor(2) as pool:  # both raylets start while the payments actor starts here
            joined = [pool.submit(providers.join, name) for name in ("good", "bad")]
            actors.append(start_payments_actor(settings.payments, namespace=NAMESPACE, settle_loop=False))
            payments = PaymentsClient(actors[-1], settings.payments.actor_call_timeout_s)
            api_key = asyncio.run(api_key_with_balance(payments, payer, 10_000_000))
            for future in joined:
                future.result()
        pipeline = {
            "num_stages": STAGES,
            # The default transport (direct links). Not a compiled graph: on the extra raylets of this one
            # machine its first requests hung (transport "auto").
            "num_replicas": 2,
            "placement_strategy": "STRICT_PACK",
            "max_num_seqs": 4,
            "max_queue": 16,
            "stage_resources": {"CPU": 1, SLOT: 1},
            "fault_injection": {
                "stage_index": STAGES - 1,
                "noise_scale": 0.5,
                "node_label": f"solanalm.io/wallet={providers.records['bad'].wallet}",
            },
        }
        settings = settings_for(app, {**base, "pipeline": pipeline})
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": settings.http.port})
        deploy(app, settings)
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{settings.http.port}/v1", api_key=api_key, max_retries=0, timeout=120
        )
        yield Cluster(providers, registry, payments, client, str(payer.pubkey()))
    finally:
        serve.shutdown()
        providers.stop_all()
        for actor in actors:
            ray.kill(actor, no_restart=True)
        from ray.experimental import internal_kv as kv

        kv._internal_kv_del(f"{network['registry_name']}/", del_by_prefix=True, namespace="solanalm-network")


def provider_wallets(record: SettlementRecord, role: str = "provider") -> set[str]:
    return {share.wallet for share in record.shares if share.role == role}


def test_a_faulty_stage_is_caught_routed_away_from_and_not_paid(cluster: Cluster) -> None:
    good, bad = cluster.wallet("good"), cluster.wallet("bad")
    # Until the first spot-check reports, both replicas score alike; two requests at once go one to each
    # (Serve takes the shorter queue among equally ranked replicas).
    served_by_bad = None
    for batch in range(3):
        with ThreadPoolExecutor(2) as pool:
            records = list(pool.map(cluster.complete, [f"Request {batch}.{i}:" for i in range(2)]))
        assert all(provider_wallets(r) in ({good}, {bad}) for r in records)  # each replica on one provider
        served_by_bad = next((r for r in records if provider_wallets(r) == {bad}), None)
        if served_by_bad is not None:
            break
    assert served_by_bad is not None, "the bad replica never got a request"

    # (a) + (c): the check of that request pins the bad node's stage and withholds its payout.
    def withheld() -> SettlementRecord | None:
        record = cluster.receipt(served_by_bad.settlement_id)
        return record if provider_wallets(record, "withheld") else None

    record = wait_for(withheld, 2 * TIMEOUT_S, "the bad provider's payout to be withheld")
    assert provider_wallets(record, "withheld") == {bad} and provider_wallets(record) == set()
    bad_node = cluster.node("bad")
    assert bad_node.verifications_failed >= 1 and bad_node.reputation < 0.3  # 0.5 -> ~0.25
    assert cluster.node("good").verifications_failed == 0

    # (b): once the routers have the new scores, every request goes to the good replica, and is paid.
    time.sleep(5.0)  # stats period 0.5 s + the registry read cache (1 s) + Serve's broadcast
    records = [cluster.complete(f"After the check {i}:") for i in range(4)]
    assert [provider_wallets(r) for r in records] == [{good}] * 4
    good_shares = [s for r in records for s in r.shares if s.wallet == good]
    assert all(s.role == "provider" and s.amount > 0 for s in good_shares)
    balance = asyncio.run(cluster.payments.balance(good))
    assert balance.unpaid_earnings >= sum(s.amount for s in good_shares)
