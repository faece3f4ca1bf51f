"""Provider registration across trust domains: a real RegistryActor in the Ray cluster, the gateway's FastAPI
app served by uvicorn on 127.0.0.1, and `solanalm provider serve` in its own OS process (no Ray, only the
gateway's URL). The provider proves its wallet, registers its stage host, heartbeats and leaves on SIGTERM;
the operator reaches its stage host with the link token; a captured registration body replayed is refused;
a provider killed without leaving goes dead when its heartbeats lapse."""

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray
import uvicorn
from solders.keypair import Keypair

from cluster.config.network import NetworkSection, ProvidersSection
from cluster.network.registry import call_registry, get_or_create_registry
from cluster.network.wallet import sign_provider_challenge, write_keypair
from cluster.security.certs import fingerprint, self_signed
from serve_apps.gateway.app import Gateway, ModelCard, create_gateway_app
from serve_apps.gateway.ingress import registry_nodes_source
from serve_apps.gateway.providers import RegistryProviders
from serve_apps.stagehost.client import RemoteStage
from serve_apps.stagehost.registration import checked_challenge
from serve_apps.stagehost.wire import FrameLimits

NAMESPACE = "solanalm-test"
REPO_ROOT = Path(__file__).resolve().parents[3]
SOLANALM = Path(sys.executable).with_name("solanalm")
MODEL = "tiny-llama"
READY_TIMEOUT_S = 180
HEARTBEAT_S, TTL_S = 0.5, 3.0


class Recorder:
    """ASGI middleware (test code) keeping the bodies of provider requests, as an eavesdropper would."""

    def __init__(self, app: Any) -> None:
        self.app, self.bodies = app, []  # type: ignore[var-annotated]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/providers/"):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []

        async def recording() -> Any:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                self.bodies.append((scope["path"], b"".join(chunks)))
            return message

        await self.app(scope, recording, send)


class NoBackend:
    def models(self) -> list[str]:
        return []


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def section(ray_cluster: None) -> Iterator[NetworkSection]:
    name = f"registry-{uuid.uuid4().hex[:8]}"  # its own registry and KV: other tests' records stay apart
    providers = ProvidersSection(heartbeat_interval_s=HEARTBEAT_S, heartbeat_ttl_s=TTL_S)
    section = NetworkSection(registry_name=name, kv_namespace=name, providers=providers)
    registry = get_or_create_registry(section, NAMESPACE)
    ray.get(registry.ping.remote(), timeout=60)
    yield section
    ray.kill(registry, no_restart=True)


@pytest.fixture(scope="module")
def gateway(section: NetworkSection) -> Iterator[tuple[str, Recorder]]:
    core = Gateway(
        NoBackend(),  # type: ignore[arg-type]
        [ModelCard(MODEL, "tests")],
        network_nodes=registry_nodes_source(section, NAMESPACE),
        providers=RegistryProviders(section, NAMESPACE),
    )
    recorder = Recorder(create_gateway_app(core))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(recorder, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, 30, "the gateway to listen")
    yield f"http://127.0.0.1:{port}", recorder
    server.should_exit = True
    thread.join(10)


class ProviderProcess:
    """`solanalm provider serve` with its own HOME and no RAY_* environment: a machine outside the cluster."""

    def __init__(self, work: Path, gateway: str, cache_dir: Path) -> None:
        self.work, self.gateway, self.cache_dir = work, gateway, cache_dir
        self.keypair = Keypair()
        self.keypair_path = write_keypair(self.keypair, work / "id.json")
        self.log = work / "provider.log"
        self.process: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "SOLANALM_"))}
        return {**env, "HOME": str(self.work / "home")}

    def start(self) -> dict[str, Any]:
        (self.work / "home").mkdir(parents=True, exist_ok=True)
        command = [str(SOLANALM), "provider", "serve", "--gateway", self.gateway, "--wallet", str(self.keypair_path)]
        command += ["--model", MODEL, "--catalogue", str(REPO_ROOT / "configs/models.yaml")]
        command += ["--cache-dir", str(self.cache_dir), "--state-dir", str(self.work / "state"), "--num-cpus", "1"]
        self.process = subprocess.Popen(
            command,
            env=self.env(),
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=self.log.open("wb"),
            start_new_session=True,
        )
        return self._ready_line()

    def _ready_line(self) -> dict[str, Any]:
        box: dict[str, Any] = {}

        def read() -> None:
            assert self.process is not None and self.process.stdout is not None
            for raw in self.process.stdout:
                with contextlib.suppress(ValueError):
                    box.update(json.loads(raw))
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(READY_TIMEOUT_S)
        if not box:
            raise AssertionError(f"no ready line from the provider:\n{self.log.read_text()[-4000:]}")
        return box

    def signal(self, signum: int) -> int | None:
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signum)
        try:
            return self.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            return self.process.wait(10)


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture()
def provider(gateway: tuple[str, Recorder], model_cache: Path, tmp_path: Path) -> Iterator[ProviderProcess]:
    process = ProviderProcess(tmp_path, gateway[0], model_cache)
    yield process
    if process.process is not None and process.process.poll() is None:
        process.signal(signal.SIGKILL)


def registry_call(section: NetworkSection, method: str, *args: Any) -> Any:
    handle = ray.get_actor(section.registry_name, namespace=NAMESPACE)
    return call_registry(handle, method, *args, timeout_s=30)


def record_of(section: NetworkSection, provider_id: str) -> Any:
    return next(r for r in registry_call(section, "list_nodes") if r.node_id == provider_id)


async def ping(endpoint: str, cert_pem: str, token: str) -> bool:
    limits = FrameLimits(hidden_size=None, vocab_size=None, kv_slots=1, max_len=16, max_step_tokens=16, max_chunks=1)
    stage = RemoteStage(endpoint, cert_pem.encode(), token, limits, timeout_s=10)
    try:
        return await stage.ping()
    finally:
        await stage.close()


def test_provider_registers_heartbeats_and_leaves(
    section: NetworkSection, gateway: tuple[str, Recorder], provider: ProviderProcess
) -> None:
    base_url, recorder = gateway
    ready = provider.start()
    pid, wallet = ready["provider_id"], str(provider.keypair.pubkey())
    assert ready["wallet"] == wallet and ready["models"] == [MODEL] and pid.startswith("provider-")
    record = record_of(section, pid)
    cert_pem = (provider.work / "state" / "stage-host.crt").read_text()
    assert (record.kind, record.health, record.endpoint, record.wallet) == (
        "provider",
        "alive",
        ready["endpoint"],
        wallet,
    )
    assert record.cert_pem == cert_pem and fingerprint(cert_pem.encode()) == ready["cert_fingerprint"]
    assert record.models == (MODEL,) and record.capabilities.num_cpus == 1
    assert pid in {r.node_id for r in registry_call(section, "eligible_nodes")}

    # Heartbeats from the other process move last_seen.
    first_seen = record.last_seen
    wait_until(lambda: record_of(section, pid).last_seen > first_seen + HEARTBEAT_S, 20, "a heartbeat")

    # The operator reaches the stage host with the link token; nobody else does.
    links = registry_call(section, "provider_links", [pid])
    link = links[pid]
    assert (link["endpoint"], link["cert_pem"], link["wallet"]) == (ready["endpoint"], cert_pem, wallet)
    assert asyncio.run(ping(link["endpoint"], link["cert_pem"], link["link_token"]))
    assert not asyncio.run(ping(link["endpoint"], link["cert_pem"], "not-the-link-token"))

    # The public listing carries neither token; the keypair never travelled.
    listing = httpx.get(f"{base_url}/v1/network/nodes", timeout=10).text
    assert link["link_token"] not in listing and "session" not in listing
    secret = bytes(provider.keypair)[:32]
    sent = b"".join(body for _, body in recorder.bodies)
    assert json.dumps(list(bytes(provider.keypair))).encode() not in sent and str(provider.keypair).encode() not in sent
    assert secret.hex().encode() not in sent

    # A captured registration, replayed, is refused (its nonce was spent).
    captured = [body for path, body in recorder.bodies if path == "/v1/providers/register"][-1]
    replay = httpx.post(
        f"{base_url}/v1/providers/register", content=captured, headers={"content-type": "application/json"}, timeout=10
    )
    assert replay.status_code == 401 and "already used" in replay.json()["error"]["message"]
    assert record_of(section, pid).health == "alive"

    # Someone else claiming the provider's endpoint with their own certificate fails the gateway's TLS probe.
    squatter, other = Keypair(), self_signed(["127.0.0.1"])
    answer = httpx.post(
        f"{base_url}/v1/providers/challenge",
        json={"wallet": str(squatter.pubkey()), "endpoint": ready["endpoint"], "cert_pem": other.cert_pem.decode()},
        timeout=10,
    ).json()
    challenge = checked_challenge(answer, str(squatter.pubkey()), ready["endpoint"], other.fingerprint)
    body = {
        "challenge": {k: v for k, v in answer.items() if k not in ("object", "message")},
        "signature": sign_provider_challenge(squatter, challenge).signature,
        "cert_pem": other.cert_pem.decode(),
    }
    squat = httpx.post(f"{base_url}/v1/providers/register", json=body, timeout=20)
    assert squat.status_code == 400 and squat.json()["error"]["code"] == "endpoint_unreachable"

    # SIGTERM: the provider leaves (draining) and exits cleanly.
    assert provider.signal(signal.SIGTERM) == 0
    assert record_of(section, pid).health in {"draining", "dead"}
    assert record_of(section, pid).draining


def test_a_killed_provider_goes_dead_when_its_heartbeats_lapse(
    section: NetworkSection, provider: ProviderProcess
) -> None:
    pid = provider.start()["provider_id"]
    assert record_of(section, pid).health == "alive"
    provider.signal(signal.SIGKILL)  # no leave
    wait_until(lambda: record_of(section, pid).health == "dead", TTL_S + 15, "the lapse")
    assert pid not in {r.node_id for r in registry_call(section, "eligible_nodes")}


def test_the_registry_keeps_providers_across_a_restart(section: NetworkSection, provider: ProviderProcess) -> None:
    pid = provider.start()["provider_id"]
    links = registry_call(section, "provider_links", [pid])
    handle = ray.get_actor(section.registry_name, namespace=NAMESPACE)
    ray.kill(handle, no_restart=False)
    wait_until(lambda: _reachable(section), 60, "the restarted registry")
    # Records and secrets were reloaded from the KV; the provider's heartbeats (same session) keep it alive.
    assert registry_call(section, "provider_links", [pid]) == links
    seen = record_of(section, pid).last_seen
    wait_until(lambda: record_of(section, pid).last_seen > seen, 20, "a heartbeat after the restart")
    assert record_of(section, pid).health == "alive"
    provider.signal(signal.SIGTERM)


def _reachable(section: NetworkSection) -> bool:
    try:
        registry_call(section, "ping")
        return True
    except Exception:  # noqa: BLE001 - still restarting
        return False
