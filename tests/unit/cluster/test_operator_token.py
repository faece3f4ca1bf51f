"""The gateway's operator token: generated 0600 into the state dir once, kept, printed by the CLI."""

import stat
from pathlib import Path

import pytest
from pydantic import SecretStr
from typer.testing import CliRunner

from cluster.cli import app
from cluster.config.serving import HttpSection
from cluster.security.operator_token import (
    find_operator_token,
    operator_headers,
    operator_token_path,
    resolve_operator_token,
)


def test_generated_once_0600_and_kept(tmp_path: Path) -> None:
    assert find_operator_token(HttpSection(), tmp_path) is None and operator_headers(HttpSection(), tmp_path) == {}
    token = resolve_operator_token(HttpSection(), tmp_path).get_secret_value()
    path = operator_token_path(tmp_path)
    assert len(token) == 64 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert resolve_operator_token(HttpSection(), tmp_path).get_secret_value() == token  # a rebuild keeps it
    assert operator_headers(HttpSection(), tmp_path) == {"Authorization": f"Bearer {token}"}


def test_the_setting_wins_and_writes_nothing(tmp_path: Path) -> None:
    section = HttpSection(operator_token=SecretStr("from-settings"))
    assert resolve_operator_token(section, tmp_path).get_secret_value() == "from-settings"
    assert not operator_token_path(tmp_path).exists() and "from-settings" not in repr(section)


def test_cli_prints_the_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOLANALM_MODEL__CACHE_DIR", str(tmp_path))
    missing = CliRunner().invoke(app, ["operator-token"])
    assert missing.exit_code == 1 and "solanalm up" in missing.output
    token = resolve_operator_token(HttpSection(), tmp_path / "state").get_secret_value()
    printed = CliRunner().invoke(app, ["operator-token"])
    assert printed.exit_code == 0 and printed.output.strip() == token
