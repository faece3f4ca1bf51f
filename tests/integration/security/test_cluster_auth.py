"""The operator's Ray cluster refuses whoever lacks its token: drivers, the dashboard's HTTP API, `ray job`.

The head is started by `head_launch` (the command and environment `solanalm up` uses) on free ports;
every driver is a separate interpreter with a clean environment and an empty HOME, so nothing of this
process (or of the user's ~/.ray) helps it.
"""

import json
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.security._heads import Head, clean_env, run_driver, start_head

OWNER = """
import json, os
from pathlib import Path
import ray
from cluster.config.serving import RaySection
from cluster.ray_cluster import connect_existing

p = json.loads(os.environ["TEST_PARAMS"])
handle = connect_existing(RaySection(**p["section"]), Path(p["state_dir"]))

@ray.remote
class Ledger:  # stands in for the payments and registry actors: named, detached, holding value
    def __init__(self):
        self.balance = 0
    def pay(self, lamports):
        self.balance += lamports
        return self.balance

for name in ("payments", "registry"):
    Ledger.options(name=name, lifetime="detached", get_if_exists=True).remote()
paid = ray.get(ray.get_actor("payments").pay.remote(1), timeout=60)
print(json.dumps({"connected": True, "paid": paid, "env": handle.ray_env}))
"""

ATTACKER = """
import json, os
import ray

p = json.loads(os.environ["TEST_PARAMS"])
out = {}
try:
    ray.init(address=p["address"], namespace=p["section"]["namespace"], log_to_driver=False)
    out["connected"] = True
except Exception as exc:
    out.update(connected=False, error=type(exc).__name__, message=str(exc)[:300])
if out["connected"]:
    for name in ("payments", "registry"):
        try:
            out[name] = ray.get(ray.get_actor(name).pay.remote(10**9), timeout=30)
        except Exception as exc:
            out[name] = type(exc).__name__
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Head]:
    head = start_head(tmp_path_factory.mktemp("token-head"), {})
    yield head
    head.stop()


def _params(head: Head) -> dict[str, str]:
    section = head.section.model_dump(mode="json", include={"head_port", "dashboard_port", "namespace"})
    return {"TEST_PARAMS": json.dumps({"section": section, "state_dir": str(head.state_dir), "address": head.address})}


def _token(head: Head) -> str:
    return Path(head.env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()


def test_the_head_runs_with_token_auth_and_a_private_token(head: Head) -> None:
    assert head.env["RAY_AUTH_MODE"] == "token"
    token_file = Path(head.env["RAY_AUTH_TOKEN_PATH"])
    assert token_file.parent == head.state_dir and token_file.stat().st_mode & 0o777 == 0o600
    assert len(_token(head)) >= 64


def test_the_owner_connects_the_way_solanalm_does(head: Head, tmp_path: Path) -> None:
    # connect_existing finds the token in the state dir, as `solanalm status/down/tui` do.
    result = run_driver(OWNER, clean_env(tmp_path, _params(head)))
    assert result["connected"] and result["paid"] >= 1
    assert result["env"]["RAY_AUTH_MODE"] == "token"


@pytest.mark.parametrize(
    "auth",
    [{}, {"RAY_AUTH_MODE": "token"}, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}],
    ids=["no-auth-at-all", "token-mode-without-token", "wrong-token"],
)
def test_a_driver_without_the_token_cannot_connect_or_reach_actors(
    head: Head, tmp_path: Path, auth: dict[str, str]
) -> None:
    run_driver(OWNER, clean_env(tmp_path / "owner", _params(head)))  # the actors exist
    result = run_driver(ATTACKER, clean_env(tmp_path, {**_params(head), **auth}))
    assert result["connected"] is False, result
    assert result["error"] in {"AuthenticationError", "ConnectionError"}, result
    assert "payments" not in result and "registry" not in result


def test_a_driver_with_the_token_can(head: Head, tmp_path: Path) -> None:
    run_driver(OWNER, clean_env(tmp_path / "owner", _params(head)))
    env = clean_env(tmp_path, {**_params(head), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": _token(head)})
    result = run_driver(ATTACKER, env)
    assert result["connected"] is True and isinstance(result["payments"], int)


def test_dashboard_api_refuses_callers_without_the_token(head: Head) -> None:
    url = f"{head.dashboard}/api/jobs/"
    assert httpx.get(url, timeout=30).status_code == 401
    wrong = {"Authorization": f"Bearer {secrets.token_hex(32)}"}
    assert httpx.get(url, headers=wrong, timeout=30).status_code == 403
    good = httpx.get(url, headers={"Authorization": f"Bearer {_token(head)}"}, timeout=30)
    assert good.status_code == 200 and isinstance(good.json(), list)


def test_ray_job_cli_works_with_solanalm_ray_env_and_not_without(head: Head, tmp_path: Path) -> None:
    cache = head.state_dir.parent  # state dir = <model.cache_dir>/state
    solanalm = Path(sys.executable).with_name("solanalm")
    ray_cli = Path(sys.executable).with_name("ray")
    listing = f"{ray_cli} job list --address {head.dashboard}"
    script = f'eval "$({solanalm} ray-env)" && {listing}'
    env = clean_env(tmp_path, {"SOLANALM_MODEL__CACHE_DIR": str(cache)})
    with_env = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert with_env.returncode == 0, with_env.stderr[-2000:]
    without = subprocess.run(["bash", "-c", listing], env=env, capture_output=True, text=True, timeout=120)
    assert without.returncode != 0 and "Authentication required" in without.stderr, without.stderr[-2000:]
