"""The web dashboard in a real browser (Debian's chromium, driven by Playwright) against a real paid-mode
deployment (tests/integration/attacks/conftest.py `deploy_paid`: Ray Serve gateway, payments actor on
LiteSVM, tiny Llama): every page loads without console errors, the live figures change while requests run
(no reload), the operator's settlement pass pays a provider on chain, and a client signed in with its wallet
(SIWS through a wallet object in the page) sees its own data and nothing of another client's, also when it
fetches the JSON endpoints directly with its key.

Screenshots go to $DASHBOARD_SCREENSHOTS when set (docs/images/dashboard-*.png were made so)."""

import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray
from ray import serve
from ray.experimental import internal_kv as kv
from solders.keypair import Keypair

from cluster.deploy import register_local_node
from cluster.security.operator_token import find_operator_token
from tests.integration.attacks.conftest import MODEL, PaidApp, Wallet, deploy_paid

CHROMIUM = Path("/usr/bin/chromium")
playwright_api = pytest.importorskip("playwright.sync_api")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (make install puts it there)"),
]
PAGES = ("/dashboard", "/dashboard/network", "/dashboard/money", "/dashboard/training", "/dashboard/me")
SHOTS = Path(os.environ["DASHBOARD_SCREENSHOTS"]) if os.environ.get("DASHBOARD_SCREENSHOTS") else None


@dataclass(frozen=True)
class Deployment:
    app: PaidApp
    root: str  # http://127.0.0.1:PORT
    operator_token: str
    provider: Keypair  # the wallet the operator's stage pays
    a: Wallet
    b: Wallet
    node_id: str  # the head, registered as the operator's own node (as `solanalm up` does)
    node_wallet: str


@pytest.fixture(scope="module")
def deployment(
    ray_cluster: None, repo_root: Path, model_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    provider = Keypair()
    state_dir = tmp_path_factory.mktemp("dash-payments")
    app = deploy_paid(repo_root, model_cache_dir, state_dir, operator_wallet=str(provider.pubkey()))
    token = find_operator_token(app.settings.http, app.settings.model.cache_dir / "state")
    assert token is not None, "the builder wrote no operator token"
    record = register_local_node(app.settings, state_dir)  # the registry and the head in it, as `up` starts them
    assert record is not None, "the registry refused the operator's node"
    try:
        yield Deployment(
            app,
            app.base_url.removesuffix("/v1"),
            token.get_secret_value(),
            provider,
            app.wallet(),
            app.wallet(),
            record.node_id,
            record.wallet,
        )
    finally:
        serve.shutdown()
        network = app.settings.network
        ray.kill(ray.get_actor(network.registry_name, namespace=app.settings.ray.namespace))
        kv._internal_kv_del(f"{network.registry_name}/", del_by_prefix=True, namespace=network.kv_namespace)


@pytest.fixture(scope="module")
def browser(deployment: Deployment) -> Iterator[Any]:
    with playwright_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield chromium
        chromium.close()


class Tab:
    """A page of its own browser context (own cookies) that records console errors and page errors."""

    def __init__(self, browser: Any, root: str) -> None:
        self.context = browser.new_context(viewport={"width": 1280, "height": 860})
        self.page = self.context.new_page()
        self.root = root
        self.errors: list[str] = []
        self.page.on("console", lambda msg: self.errors.append(msg.text) if msg.type == "error" else None)
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))

    def open(self, path: str) -> Any:
        response = self.page.goto(self.root + path, wait_until="load")
        assert response is not None and response.status == 200, (path, response and response.status)
        return self.page

    def sign_in_operator(self, token: str) -> None:
        self.open("/dashboard")
        self.page.fill("#operator-login input[name=token]", token)
        with self.page.expect_navigation():
            self.page.click("#operator-login button")

    def shot(self, name: str) -> None:
        if SHOTS is not None:
            SHOTS.mkdir(parents=True, exist_ok=True)
            self.page.screenshot(path=str(SHOTS / f"dashboard-{name}.png"))

    def close(self) -> None:
        self.context.close()


def chat(app: PaidApp, wallet: Wallet, n: int = 1) -> list[str]:
    """n paid requests; their settlement ids."""
    ids = []
    for _ in range(n):
        response = httpx.post(
            app.base_url + "/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8},
            headers=wallet.headers,
            timeout=120,
        )
        response.raise_for_status()
        ids.append(response.json()["settlement_id"])
    return ids


def test_every_page_loads_without_console_errors(deployment: Deployment, browser: Any) -> None:
    chat(deployment.app, deployment.a)  # something on every money and usage view
    for who in ("anonymous", "operator"):
        tab = Tab(browser, deployment.root)
        if who == "operator":
            tab.sign_in_operator(deployment.operator_token)
        for path in PAGES:
            page = tab.open(path)
            page.wait_for_timeout(300)  # the SSE connection and charts start
            if who == "operator" and path == "/dashboard/training":
                tab.shot(path.rsplit("/", 1)[-1])
        assert tab.errors == [], (who, tab.errors)
        tab.close()


def test_live_figures_change_without_a_reload(deployment: Deployment, browser: Any) -> None:
    tab = Tab(browser, deployment.root)
    page = tab.open("/dashboard")
    page.evaluate("window.__notReloaded = true")
    cell = f'#figures tr[data-model="{MODEL}"] td.requests-total'
    before = float(page.inner_text(cell).replace("-", "0"))
    worker = threading.Thread(target=chat, args=(deployment.app, deployment.b, 4))
    worker.start()
    page.wait_for_function(
        "([sel, before]) => parseFloat(document.querySelector(sel).textContent) >= before + 2",
        arg=[cell, before],
        timeout=90_000,
    )
    worker.join(120)
    page.wait_for_timeout(1500)  # a few more points on the chart
    tab.shot("live")
    assert page.evaluate("window.__notReloaded") is True  # swapped in by htmx over SSE, not reloaded
    tokens = float(page.inner_text(f'#figures tr[data-model="{MODEL}"] td.tokens-total'))
    assert tokens > 0
    assert page.locator("#chart-rates canvas").count() == 1  # uPlot drew the chart
    assert tab.errors == [], tab.errors
    tab.close()


def test_operator_settlement_pass_pays_the_provider_on_chain(deployment: Deployment, browser: Any) -> None:
    chat(deployment.app, deployment.a, 2)  # the provider wallet earns
    provider = str(deployment.provider.pubkey())
    tab = Tab(browser, deployment.root)
    tab.sign_in_operator(deployment.operator_token)
    page = tab.open("/dashboard/money")
    row = page.locator(f'#wallets tr[data-wallet="{provider}"]')
    assert int(row.locator("td.unpaid").inner_text()) > 0
    with page.expect_navigation():
        page.click("#settle")
    assert "settled:" in page.inner_text("#done")
    row = page.locator(f'#wallets tr[data-wallet="{provider}"]')
    assert int(row.locator("td.paid").inner_text()) > 0 and int(row.locator("td.unpaid").inner_text()) == 0
    signature = row.locator("td.signatures span").first.inner_text()
    assert re.fullmatch(r"[1-9A-HJ-NP-Za-km-z]{64,90}", signature), signature
    tab.shot("money")
    assert tab.errors == [], tab.errors
    tab.close()
    # The action needs the operator: a client's key cannot run it, nor read the money view.
    assert httpx.get(deployment.root + "/dashboard/api/money", headers=deployment.a.headers).status_code == 401
    refused = httpx.post(deployment.root + "/dashboard/actions/settle", headers=deployment.a.headers)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_operator_token"


def test_network_shows_the_provider_and_the_operator_drains_it(deployment: Deployment, browser: Any) -> None:
    anonymous = Tab(browser, deployment.root)
    page = anonymous.open("/dashboard/network")
    assert deployment.node_wallet in page.inner_text("#providers")
    assert deployment.node_id not in page.content()  # node ids are the operator's
    assert page.locator(f'.pipeline[data-model="{MODEL}"] rect.stage').count() == 1  # one stage: all the layers
    anonymous.close()
    tab = Tab(browser, deployment.root)
    tab.sign_in_operator(deployment.operator_token)
    page = tab.open("/dashboard/network")
    row = f'#providers tr[data-node="{deployment.node_id}"]'
    assert page.inner_text(f"{row} td.health") == "alive"
    with page.expect_navigation():
        page.click(f"{row} button")
    assert page.inner_text(f"{row} td.health") == "draining"
    nodes = httpx.get(deployment.app.base_url + "/network/nodes", timeout=30).json()["data"]
    assert [n["health"] for n in nodes if n["wallet"] == deployment.node_wallet] == ["draining"]
    with page.expect_navigation():
        page.click(f"{row} button")  # undrain
    assert page.inner_text(f"{row} td.health") == "alive"
    with page.expect_navigation():  # re-plan: the request waits in the registry for the placement controller
        page.click(f'.pipeline[data-model="{MODEL}"] button.replan')
    assert "re-plan asked" in page.url.replace("%20", " ")
    registry = ray.get_actor(
        deployment.app.settings.network.registry_name, namespace=deployment.app.settings.ray.namespace
    )
    assert ray.get(registry.take_replan_requests.remote(), timeout=30) == [MODEL]
    tab.shot("network")
    assert tab.errors == [], tab.errors
    tab.close()


WALLET_JS = """
window.solana = {
  publicKey: { toString: () => window.__walletAddress },
  connect: async () => ({ publicKey: { toString: () => window.__walletAddress } }),
  signMessage: async (bytes) => ({ signature: new Uint8Array(await window.__walletSign(Array.from(bytes))) }),
};
"""


def test_a_client_sees_only_its_own_data(deployment: Deployment, browser: Any) -> None:
    a_ids, b_ids = chat(deployment.app, deployment.a, 2), chat(deployment.app, deployment.b, 1)
    tab = Tab(browser, deployment.root)
    # A wallet in the page, as Phantom provides one: it signs with A's key (in this test process).
    keypair = deployment.a.keypair
    tab.context.expose_function("__walletSign", lambda data: list(bytes(keypair.sign_message(bytes(data)))))
    tab.context.add_init_script(f"window.__walletAddress = {str(keypair.pubkey())!r};" + WALLET_JS)
    page = tab.open("/dashboard/me")
    with page.expect_navigation():
        page.click("#siws")
    assert page.inner_text("#my-wallet") == deployment.a.address
    table = page.inner_text("#settlements")
    assert all(i in table for i in a_ids) and not any(i in table for i in b_ids)
    html = page.content()
    assert deployment.b.address not in html and not any(i in html for i in b_ids)
    tab.shot("me")
    assert tab.errors == [], tab.errors
    tab.close()
    # The JSON endpoints with A's key: A's data only; B's receipt is not A's to read.
    me = httpx.get(deployment.root + "/dashboard/api/me", headers=deployment.a.headers, timeout=30).json()
    assert me["wallet"] == deployment.a.address and {s["settlement_id"] for s in me["settlements"]} >= set(a_ids)
    assert deployment.b.address not in str(me) and not any(i in str(me) for i in b_ids)
    receipt = httpx.get(f"{deployment.app.base_url}/receipts/{b_ids[0]}", headers=deployment.a.headers, timeout=30)
    assert receipt.status_code in (403, 404)
    # The live stream is the network's aggregate: no wallet and no settlement in it.
    with httpx.stream("GET", deployment.root + "/dashboard/events", headers=deployment.a.headers, timeout=30) as s:
        started, seen = time.monotonic(), ""
        for chunk in s.iter_text():
            seen += chunk
            if "event: figures" in seen and seen.count("\n\n") >= 2 or time.monotonic() - started > 10:
                break
    assert "event: figures" in seen
    assert deployment.b.address not in seen and deployment.a.address not in seen
    assert not any(i in seen for i in a_ids + b_ids)
