"""The provider network on a real Ray cluster: two extra Ray nodes on this machine join with wallets
(`ray start --address ... --labels ... --block`, one process group each), the registry verifies and
persists them across an actor restart; then the real Serve application (tiny-llama) is planned onto
them, its stages pinned by label, and when one node is stopped the placement controller re-plans and
redeploys while a loop of OpenAI requests keeps succeeding."""

import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import ray
from ray import serve
from solders.keypair import Keypair

from cluster.config import Settings
from cluster.config.network import NetworkSection
from cluster.deploy import (
    ServeApp,
    deploy,
    model_costs,
    plan_deployment,
    read_serve_config,
    settings_for,
    start_controller,
    with_plans,
)
from cluster.network import join as joining
from cluster.network.records import NodeCapabilities, NodeRecord
from cluster.network.registry import call_registry, get_or_create_registry
from cluster.network.wallet import ProofError, sign_challenge, write_keypair
from cluster.tui.source import ClusterSource
from tests.integration.operator_views import detail_health

pytestmark = pytest.mark.slow
NAMESPACE = "solanalm-test"
TIMEOUT_S = 60
REPLACE_TIMEOUT_S = 240
# deploy() passes no `ray` section to the builder, so the gateway looks up named actors (payments) in the
# default namespace.
GATEWAY_NAMESPACE = "solanalm"
PROVIDER_CPUS = 2  # one stage of the old and one of the new placement fit during a rolling update


class Providers:
    """Two provider Ray nodes started by `join`, each `ray start --block` in its own process group."""

    def __init__(self, settings: NetworkSection, tmp: Path) -> None:
        self.settings, self.tmp = settings, tmp
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.records: dict[str, NodeRecord] = {}
        self.temp_dirs: list[str] = []

    def join(self, name: str, gflops: float) -> NodeRecord:
        keypair_path = write_keypair(Keypair(), self.tmp / f"{name}.json")

        def start(command: list[str]) -> None:
            # Its own (short: socket paths) temp dir, so `ray start` does not point /tmp/ray/ray_current_cluster,
            # which a bare ray.init() on this machine follows, at the test cluster.
            temp_dir = tempfile.mkdtemp(prefix="slm-", dir="/tmp")
            self.temp_dirs.append(temp_dir)
            self.processes[name] = subprocess.Popen(
                [*command, f"--temp-dir={temp_dir}"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )

        node, record = joining.join(
            ray.get_runtime_context().gcs_address,
            keypair_path,
            self.settings,
            NAMESPACE,
            region=f"{name}-region",
            num_cpus=PROVIDER_CPUS,
            capabilities=NodeCapabilities(throughput_gflops=gflops),
            runner=start,
            block=True,
        )
        self.records[name] = record
        return record

    def stop(self, name: str) -> None:
        process = self.processes.pop(name)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=TIMEOUT_S)

    def stop_all(self) -> None:
        for name in list(self.processes):
            self.stop(name)
        for temp_dir in self.temp_dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def network(ray_cluster: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Providers, Any]]:
    settings = NetworkSection(
        registry_name=f"solanalm-registry-{uuid.uuid4().hex[:8]}", persist_interval_s=0, join_timeout_s=TIMEOUT_S
    )
    registry = get_or_create_registry(settings, NAMESPACE)
    providers = Providers(settings, tmp_path_factory.mktemp("wallets"))
    try:
        with ThreadPoolExecutor(2) as pool:  # both raylets start at once (each takes ~10-25 s here)
            list(pool.map(providers.join, ["fast", "slow"], [20.0, 10.0]))
        yield providers, registry
    finally:
        providers.stop_all()
        ray.kill(registry, no_restart=True)
        from ray.experimental import internal_kv as kv

        kv._internal_kv_del(f"{settings.registry_name}/", del_by_prefix=True, namespace=settings.kv_namespace)


def test_providers_join_with_their_labels(network: tuple[Providers, Any]) -> None:
    providers, registry = network
    records = {r.node_id: r for r in call_registry(registry, "list_nodes", timeout_s=TIMEOUT_S)}
    for name, joined in providers.records.items():
        record = records[joined.node_id]
        assert (record.health, record.verified, record.region) == ("alive", True, f"{name}-region")
        assert record.labels["solanalm.io/wallet"] == record.wallet and record.capabilities.num_cpus == PROVIDER_CPUS
    assert len(call_registry(registry, "eligible_nodes", timeout_s=TIMEOUT_S)) == 2


def test_a_node_without_the_wallet_label_gets_no_registration(network: tuple[Providers, Any]) -> None:
    _, registry = network
    head, keypair = ray.get_runtime_context().get_node_id(), Keypair()
    challenge = call_registry(registry, "issue_challenge", head, str(keypair.pubkey()), timeout_s=TIMEOUT_S)
    with pytest.raises(ProofError, match="not labelled"):
        ray.get(registry.register.remote(sign_challenge(keypair, challenge), NodeCapabilities()), timeout=TIMEOUT_S)


def test_registry_state_survives_an_actor_restart(network: tuple[Providers, Any]) -> None:
    providers, registry = network
    fast = providers.records["fast"].node_id
    call_registry(registry, "record_request", [fast], True, 0.25, timeout_s=TIMEOUT_S)
    ray.kill(registry, no_restart=False)
    records = {r.node_id: r for r in call_registry(registry, "list_nodes", timeout_s=TIMEOUT_S)}
    assert records[fast].requests_served == 1 and records[fast].latency_ewma_s == 0.25
    assert len(records) == 2
    # The registry lives on the head, never on a provider node that may leave.
    head = ray.get_runtime_context().get_node_id()
    assert call_registry(registry, "node_id", timeout_s=TIMEOUT_S) == head


class RequestLoop:
    """Sends small chat requests back to back (official `openai` client) and records every outcome."""

    def __init__(self, client: openai.OpenAI) -> None:
        self.client = client
        self.outcomes: list[tuple[float, str]] = []  # (seconds taken, "ok" or the error)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "RequestLoop":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(REPLACE_TIMEOUT_S)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.perf_counter()
            try:
                ask(self.client)
                outcome = "ok"
            except openai.OpenAIError as exc:
                outcome = f"{type(exc).__name__}: {exc}"
            self.outcomes.append((time.perf_counter() - started, outcome))

    def wait_for(self, count: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.outcomes) < count and time.monotonic() < deadline:
            time.sleep(0.2)


def ask(client: openai.OpenAI) -> str:
    reply = client.chat.completions.create(
        model="tiny-llama", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0.0
    )
    return reply.choices[0].message.content or ""


def stage_nodes(base_url: str, settings: Settings) -> list[str]:
    """Where the pipeline's stages run, as the gateway's /healthz?detail=1 reports (describe of the stage actors)."""
    try:
        health = detail_health(base_url, settings, TIMEOUT_S).json()
    except httpx.HTTPError:  # the gateway itself is being replaced
        return []
    (pipeline,) = health["pipelines"]
    return [stage["node_id"] for stage in pipeline.get("stages", [])]


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.5)


def serve_settings(repo_root: Path, cache: Path, tmp: Path, registry_name: str) -> tuple[ServeApp, Settings]:
    # One machine: every node's HTTP proxy would bind the same port, and the one that won could be on the
    # node the test stops; providers on their own hosts would keep EveryNode.
    app = dataclasses.replace(read_serve_config(repo_root / "configs" / "serve.yaml"), proxy_location="HeadOnly")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    settings = settings_for(
        app,
        {
            "ray": {"namespace": NAMESPACE},
            "model": {
                "served": ["tiny-llama"],
                "cache_dir": str(cache),
                "catalogue": str(repo_root / "configs" / "models.yaml"),
            },
            # A replaced pipeline replica gets 5 s to finish (its requests are then re-sent by the gateway);
            # the replaced gateway may finish its requests for request_timeout_s.
            "pipeline": {
                "max_num_seqs": 4,
                "max_queue": 16,
                "graceful_shutdown_timeout_s": 5,
                # The default transport (direct links between the nodes' stages). Not a compiled graph: across
                # nodes it crashed the surviving node's raylet when the other node died (Ray 2.55).
                "request_timeout_s": REPLACE_TIMEOUT_S,
            },
            "http": {"port": port},
            "payments": {"state_dir": str(tmp), "actor_name": f"payments-{registry_name}"},
            "network": {
                "registry_name": registry_name,
                "persist_interval_s": 0,
                "placement": {"min_stage_gain": 0.0, "watch_interval_s": 0.5},
            },
        },
    )
    return app, settings


def start_payments_on_head(settings: Settings) -> None:
    """The payments actor the gateway would start itself (same name, get_if_exists), started first so it
    is up before the providers' stages load; start_payments_actor pins it to the head (its ledger's disk)."""
    from payments.client import start_payments_actor

    start_payments_actor(settings.payments, namespace=GATEWAY_NAMESPACE)


def test_stages_are_planned_onto_providers_and_move_when_one_leaves(
    network: tuple[Providers, Any], repo_root: Path, model_cache_dir: Path, tmp_path: Path
) -> None:
    providers, registry = network
    fast, slow = providers.records["fast"].node_id, providers.records["slow"].node_id
    app, settings = serve_settings(repo_root, model_cache_dir, tmp_path, providers.settings.registry_name)
    costs = model_costs(settings)
    plans = plan_deployment(settings, costs)
    # tiny-llama: lm_head outweighs the 6 small layers, so the faster node takes the head and one layer.
    assert plans["tiny-llama"].node_ids == [slow, fast] and plans["tiny-llama"].weights == [5.0, 1.0]
    start_payments_on_head(settings)
    deploy(app, with_plans(settings, plans))
    base_url = f"http://127.0.0.1:{settings.http.port}/v1"
    client = openai.OpenAI(base_url=base_url, api_key="test", max_retries=0, timeout=REPLACE_TIMEOUT_S)
    controller = start_controller(app, settings, plans, costs)
    try:
        assert stage_nodes(base_url, settings) == [slow, fast]  # each stage runs on its planned provider node
        # The TUI's live source sees the same placement and one earnings row per provider wallet.
        snapshot = ClusterSource(settings).read()
        wallets = {providers.records[n].node_id: providers.records[n].wallet for n in ("fast", "slow")}
        (pipeline,) = snapshot.pipelines
        assert [(s.node_id, s.wallet) for s in pipeline.stages] == [(slow, wallets[slow]), (fast, wallets[fast])]
        assert {e.wallet for e in snapshot.earnings} == set(wallets.values())
        with RequestLoop(client) as loop:
            loop.wait_for(2, TIMEOUT_S)
            before = len(loop.outcomes)
            providers.stop("slow")  # that node's `ray start --block` process group only
            # Generous: a redeploy starts new stage processes, ~30 s here, minutes on a loaded 2-core machine.
            wait_until(
                lambda: stage_nodes(base_url, settings) == [fast],
                REPLACE_TIMEOUT_S,
                "the stages to move to the fast node",
            )
            wait_until(lambda: bool(controller.history), REPLACE_TIMEOUT_S, "the controller's redeploy to finish")
            loop.wait_for(len(loop.outcomes) + 2, TIMEOUT_S)
        event = controller.history[0]
        assert event.departed == (slow,) and event.plans["tiny-llama"].node_ids == [fast]
        failures = [outcome for _, outcome in loop.outcomes if outcome != "ok"]
        assert not failures, failures
        assert len(loop.outcomes) >= before + 3, loop.outcomes
        slowest = max(taken for taken, _ in loop.outcomes)
        print(
            f"re-placement: {len(loop.outcomes)} requests, all ok, slowest {slowest:.1f} s, "
            f"redeploy {event.redeploy_s:.1f} s"
        )
    finally:
        controller.stop()
        serve.shutdown()
        with contextlib.suppress(ValueError):
            ray.kill(ray.get_actor(settings.payments.actor_name, namespace=GATEWAY_NAMESPACE))
