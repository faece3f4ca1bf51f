"""Ray token auth and TLS wiring: the token file, the variables each process gets, the CLI commands."""

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import ValidationError
from typer.testing import CliRunner

from cluster import ray_cluster
from cluster.cli import app
from cluster.config.serving import HttpSection, RaySection
from cluster.security import ray_auth
from cluster.security.ray_auth import RayAuthError, apply_to_process, driver_env, ensure_token, head_env
from cluster.security.ray_tls import RayTlsError, TlsFiles, init_tls, tls_env

RAY_VARS = (
    "RAY_AUTH_MODE",
    "RAY_AUTH_TOKEN",
    "RAY_AUTH_TOKEN_PATH",
    "RAY_USE_TLS",
    "RAY_TLS_SERVER_CERT",
    "RAY_TLS_SERVER_KEY",
    "RAY_TLS_CA_CERT",
)


@pytest.fixture(autouse=True)
def _no_ray_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No operator variables and an empty HOME (so no ~/.ray/auth_token); whatever a test (or the code
    under test, through os.environ) sets is undone after it."""
    saved = {name: os.environ.pop(name, None) for name in RAY_VARS}
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    yield
    for name, value in saved.items():
        os.environ.pop(name, None)
        if value is not None:
            os.environ[name] = value


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---- the token file ----------------------------------------------------------------------------


def test_token_is_created_private_random_and_kept(tmp_path: Path) -> None:
    path = ensure_token(tmp_path / "state" / "ray-auth-token")
    token = path.read_text()
    assert _mode(path) == 0o600 and len(token) == 64 and int(token, 16) >= 0
    assert ensure_token(path).read_text() == token  # a second `up` keeps it: nodes already hold it
    assert ensure_token(tmp_path / "other").read_text() != token


def test_a_loose_token_file_is_tightened_and_an_empty_one_refused(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("secret")
    path.chmod(0o644)
    ensure_token(path)
    assert _mode(path) == 0o600
    empty = tmp_path / "empty"
    empty.touch(mode=0o600)
    with pytest.raises(RayAuthError, match="empty"):
        ensure_token(empty)


# ---- which variables a head and a driver get ---------------------------------------------------


def test_a_local_head_gets_token_auth_by_default(tmp_path: Path) -> None:
    env = head_env(RaySection(), tmp_path)
    assert env == {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "ray-auth-token")}
    assert (tmp_path / "ray-auth-token").is_file()


def test_disabled_auth_sets_nothing(tmp_path: Path) -> None:
    assert head_env(RaySection(auth="disabled"), tmp_path) == {}
    assert not (tmp_path / "ray-auth-token").exists()
    ensure_token(tmp_path / "ray-auth-token")
    assert driver_env(RaySection(auth="disabled"), tmp_path) == {}


def test_operator_supplied_tokens_win(tmp_path: Path) -> None:
    assert head_env(RaySection(), tmp_path, {"RAY_AUTH_TOKEN": "t" * 64}) == {"RAY_AUTH_MODE": "token"}
    custom = tmp_path / "custom-token"
    env = head_env(RaySection(), tmp_path, {"RAY_AUTH_TOKEN_PATH": str(custom)})
    assert env["RAY_AUTH_TOKEN_PATH"] == str(custom) and _mode(custom) == 0o600
    setting = tmp_path / "from-settings"
    assert head_env(RaySection(auth_token_path=setting), tmp_path)["RAY_AUTH_TOKEN_PATH"] == str(setting)


def test_a_driver_finds_the_token_like_solanalm_up_wrote_it(tmp_path: Path) -> None:
    section = RaySection(address="10.0.0.1:6379")
    assert driver_env(section, tmp_path, {}) == {}  # none anywhere: connect as Ray would without auth
    ensure_token(tmp_path / "ray-auth-token")
    assert driver_env(section, tmp_path, {}) == {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(tmp_path / "ray-auth-token"),
    }
    assert driver_env(section, tmp_path, {"RAY_AUTH_TOKEN": "x"}) == {"RAY_AUTH_MODE": "token"}


def test_a_driver_falls_back_to_rays_default_token_file(tmp_path: Path) -> None:
    default = Path(os.environ["HOME"]) / ".ray" / "auth_token"
    default.parent.mkdir(parents=True)
    default.write_text("k" * 64)
    assert driver_env(RaySection(), tmp_path / "state", {})["RAY_AUTH_TOKEN_PATH"] == str(default)


def test_apply_leaves_a_connected_ray_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    reloads: list[bool] = []
    monkeypatch.setattr(ray_auth, "_reload_ray_config", lambda: reloads.append(True))
    monkeypatch.setitem(sys.modules, "ray", SimpleNamespace(is_initialized=lambda: True))
    assert apply_to_process({"RAY_AUTH_MODE": "token"}) is False
    assert "RAY_AUTH_MODE" not in os.environ and reloads == []
    monkeypatch.setitem(sys.modules, "ray", SimpleNamespace(is_initialized=lambda: False))
    assert apply_to_process({"RAY_AUTH_MODE": "token"}) is True
    assert os.environ["RAY_AUTH_MODE"] == "token" and reloads == [True]


def test_up_starts_the_head_and_the_driver_with_the_token(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    started: dict = {}
    monkeypatch.setattr(ray_cluster, "port_in_use", lambda host, port: False)

    def fake_run(command, **kwargs):  # type: ignore[no-untyped-def]
        started.update(command=command, env=kwargs["env"])
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(ray_cluster.subprocess, "run", fake_run)
    monkeypatch.setattr(
        ray_cluster, "_connect", lambda address, ns, here, env: ray_cluster.ClusterHandle("a", None, here, env)
    )
    driver = ray_cluster.ensure_cluster(RaySection(head_port=16379), 2, tmp_path).ray_env
    token_path = str(tmp_path / "ray-auth-token")
    assert started["command"][1:3] == ["start", "--head"]
    assert started["env"]["RAY_AUTH_MODE"] == "token" and started["env"]["RAY_AUTH_TOKEN_PATH"] == token_path
    assert driver == {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": token_path}


def test_up_with_an_address_joins_with_the_token_found_and_creates_none(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(
        ray_cluster, "_connect", lambda address, ns, here, env: ray_cluster.ClusterHandle(address, None, here, env)
    )
    section = RaySection(address="10.0.0.1:6379")
    assert ray_cluster.ensure_cluster(section, 2, tmp_path).ray_env == {}
    assert not (tmp_path / "ray-auth-token").exists()  # joining never invents a token
    ensure_token(tmp_path / "ray-auth-token")
    assert ray_cluster.ensure_cluster(section, 2, tmp_path).ray_env["RAY_AUTH_MODE"] == "token"
    assert ray_cluster.connect_existing(section, tmp_path).ray_env["RAY_AUTH_MODE"] == "token"  # status/down/tui


def test_prepare_driver_is_what_other_entry_points_call(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(ray_auth, "_reload_ray_config", lambda: None)
    monkeypatch.setitem(sys.modules, "ray", SimpleNamespace(is_initialized=lambda: False))
    assert ray_cluster.prepare_driver(RaySection(), tmp_path) == {}
    ensure_token(tmp_path / "ray-auth-token")
    assert ray_cluster.prepare_driver(RaySection(), tmp_path)["RAY_AUTH_MODE"] == "token"
    assert os.environ["RAY_AUTH_TOKEN_PATH"] == str(tmp_path / "ray-auth-token")
    with pytest.raises(ray_cluster.ClusterError, match="tls init"):
        ray_cluster.prepare_driver(RaySection(tls=True), tmp_path)


# ---- TLS ---------------------------------------------------------------------------------------


def test_tls_init_writes_a_ca_and_a_node_cert_it_signed(tmp_path: Path) -> None:
    files = init_tls(tmp_path / "tls", ["localhost", "127.0.0.1", "10.0.0.5"])
    assert _mode(tmp_path / "tls") == 0o700 and _mode(files.key) == 0o600 and _mode(files.ca_key) == 0o600
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    node = x509.load_pem_x509_certificate(files.cert.read_bytes())
    public_key = ca.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    node.verify_directly_issued_by(ca)
    san = node.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "10.0.0.5" in {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    worker = init_tls(tmp_path / "tls", ["10.0.0.6"], name="worker1")
    assert worker.ca_cert.read_bytes() == files.ca_cert.read_bytes()  # one CA for the cluster
    x509.load_pem_x509_certificate(worker.cert.read_bytes()).verify_directly_issued_by(ca)


def test_tls_env_is_off_by_default_and_needs_its_files(tmp_path: Path) -> None:
    assert tls_env(RaySection(), tmp_path) == {}
    with pytest.raises(RayTlsError, match="solanalm tls init"):
        tls_env(RaySection(tls=True), tmp_path)
    files = init_tls(tmp_path / "tls", ["localhost"])
    assert tls_env(RaySection(tls=True), tmp_path) == {
        "RAY_USE_TLS": "1",
        "RAY_TLS_SERVER_CERT": str(files.cert),
        "RAY_TLS_SERVER_KEY": str(files.key),
        "RAY_TLS_CA_CERT": str(files.ca_cert),
    }
    assert TlsFiles.under(tmp_path / "tls") == files


# ---- settings and CLI --------------------------------------------------------------------------


def test_security_settings_are_validated() -> None:
    assert RaySection().auth == "token" and RaySection().tls is False
    with pytest.raises(ValidationError):
        RaySection.model_validate({"auth": "none"})
    with pytest.raises(ValidationError, match="together"):
        HttpSection(ssl_certfile=Path("c.pem"))
    assert HttpSection().scheme == "http"
    assert HttpSection(ssl_certfile=Path("c.pem"), ssl_keyfile=Path("k.pem")).scheme == "https"


def test_cli_tls_init_and_ray_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SOLANALM_MODEL__CACHE_DIR", str(tmp_path / "cache"))
    runner = CliRunner()
    assert runner.invoke(app, ["ray-env"]).output.strip() == ""  # no token yet, TLS off
    ensure_token(tmp_path / "cache" / "state" / "ray-auth-token")
    exports = runner.invoke(app, ["ray-env"]).output
    assert "export RAY_AUTH_MODE=token" in exports
    assert f"export RAY_AUTH_TOKEN_PATH={tmp_path / 'cache' / 'state' / 'ray-auth-token'}" in exports
    result = runner.invoke(app, ["tls", "init", "--host", "10.1.2.3"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cache" / "state" / "tls" / "node.key").is_file() and "10.1.2.3" in result.output
    monkeypatch.setenv("SOLANALM_RAY__TLS", "true")
    assert "export RAY_USE_TLS=1" in runner.invoke(app, ["ray-env"]).output
    other = runner.invoke(app, ["tls", "init", "--dir", str(tmp_path / "d"), "--name", "w2"])
    assert other.exit_code == 0 and (tmp_path / "d" / "w2.crt").is_file()
