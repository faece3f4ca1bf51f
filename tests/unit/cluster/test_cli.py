import socket

from typer.testing import CliRunner

from cluster.cli import app


def _unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_status_without_a_cluster_says_how_to_start_one(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("SOLANALM_RAY__HEAD_PORT", str(_unused_port()))
    result = CliRunner().invoke(app, ["status"])
    output = " ".join(result.output.split())
    assert result.exit_code == 1
    assert "no Ray cluster is running" in output and "solanalm up" in output


def test_chat_without_a_server_is_a_clear_error() -> None:
    result = CliRunner().invoke(app, ["chat", "hi", "--model", "m", "--url", f"http://127.0.0.1:{_unused_port()}/v1"])
    assert result.exit_code == 1 and "cannot reach" in " ".join(result.output.split())


def test_plugins_are_mounted() -> None:
    result = CliRunner().invoke(app, ["--help"])
    assert "up" in result.output and "status" in result.output and "down" in result.output


def test_address_option_survives_other_ray_env_overrides(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # An env override of another ray field used to replace the whole section and drop --address.
    monkeypatch.setenv("SOLANALM_RAY__HEAD_PORT", str(_unused_port()))
    address = f"127.0.0.1:{_unused_port()}"
    result = CliRunner().invoke(app, ["status", "--address", address])
    assert result.exit_code == 1
    assert f"no Ray cluster is running at {address}" in " ".join(result.output.split())
