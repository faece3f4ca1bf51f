"""Ray's mutual TLS with `solanalm tls init`'s certificates: a head started as `solanalm up` starts one with
`ray.tls` on accepts a driver holding a certificate from the cluster's CA and refuses one without TLS, or
with a certificate from another CA."""

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.security.ray_tls import default_hosts, init_tls
from tests.integration.security._heads import Head, clean_env, run_driver, start_head

DRIVER = """
import json, os
from pathlib import Path
import ray
from cluster.config.serving import RaySection
from cluster.ray_cluster import ClusterError, connect_existing

p = json.loads(os.environ["TEST_PARAMS"])
out = {}
try:
    if p["via_solanalm"]:
        out["env"] = connect_existing(RaySection(**p["section"]), Path(p["state_dir"])).ray_env
    else:
        ray.init(address=p["address"], log_to_driver=False)
    out["answer"] = ray.get(ray.remote(lambda: 42).remote(), timeout=60)
    out["connected"] = True
except Exception as exc:
    out.update(connected=False, error=type(exc).__name__, message=str(exc)[:300])
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def tls_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Head]:
    base = tmp_path_factory.mktemp("tls-head")
    init_tls(base / "state" / "tls", default_hosts())  # what `solanalm tls init` writes
    head = start_head(base, {"tls": True})
    yield head
    head.stop()


def _params(head: Head, via_solanalm: bool) -> dict[str, str]:
    section = head.section.model_dump(mode="json", include={"head_port", "dashboard_port", "namespace", "tls"})
    params = {"section": section, "state_dir": str(head.state_dir), "address": head.address}
    return {"TEST_PARAMS": json.dumps({**params, "via_solanalm": via_solanalm})}


def test_the_head_runs_with_tls(tls_head: Head) -> None:
    assert tls_head.env["RAY_USE_TLS"] == "1" and tls_head.env["RAY_AUTH_MODE"] == "token"
    assert Path(tls_head.env["RAY_TLS_CA_CERT"]).parent == tls_head.state_dir / "tls"


def test_a_driver_with_the_clusters_certificate_connects(tls_head: Head, tmp_path: Path) -> None:
    result = run_driver(DRIVER, clean_env(tmp_path, _params(tls_head, via_solanalm=True)))
    assert result["connected"] and result["answer"] == 42, result
    assert result["env"]["RAY_USE_TLS"] == "1"


def test_a_driver_without_tls_is_refused(tls_head: Head, tmp_path: Path) -> None:
    token = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": tls_head.env["RAY_AUTH_TOKEN_PATH"]}
    started = time.monotonic()
    result = run_driver(DRIVER, clean_env(tmp_path, {**_params(tls_head, via_solanalm=False), **token}))
    assert result["connected"] is False, result
    assert time.monotonic() - started < 60


def test_a_driver_with_another_cas_certificate_is_refused(tls_head: Head, tmp_path: Path) -> None:
    rogue = init_tls(tmp_path / "rogue", default_hosts())
    token = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": tls_head.env["RAY_AUTH_TOKEN_PATH"]}
    env = clean_env(tmp_path, {**_params(tls_head, via_solanalm=False), **token, **rogue.env()})
    result = run_driver(DRIVER, env)
    assert result["connected"] is False, result
