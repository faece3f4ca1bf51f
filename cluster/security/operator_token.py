"""The gateway's operator token: what the operator's views of the gateway (`/healthz?detail=1`,
`/v1/network/nodes?detail=1`: pids, node ids, endpoints, exception text) require as `Authorization: Bearer`.

`http.operator_token` when set (SOLANALM_HTTP__OPERATOR_TOKEN); else a random token in
<state dir>/operator-token, created 0600 by whatever builds the app (`solanalm up`, `serve run`) exactly as
the Ray token is (ray_auth.ensure_token), and read from there by the operator's tools (`solanalm
operator-token`, the benchmarks, the tests). Anonymous callers get liveness only.
"""

from pathlib import Path

from pydantic import SecretStr

from cluster.config.serving import HttpSection
from cluster.security.ray_auth import ensure_token

OPERATOR_TOKEN_FILENAME = "operator-token"


def operator_token_path(state_dir: Path) -> Path:
    return state_dir.expanduser() / OPERATOR_TOKEN_FILENAME


def resolve_operator_token(section: HttpSection, state_dir: Path) -> SecretStr:
    """The configured token, else the state dir's file (generated on first use)."""
    if section.operator_token is not None:
        return section.operator_token
    path = ensure_token(operator_token_path(state_dir), what="gateway operator token")
    return SecretStr(path.read_text().strip())


def find_operator_token(section: HttpSection, state_dir: Path) -> SecretStr | None:
    """The token a client of a running gateway presents: the setting, else the state dir's file; None when
    neither exists (nothing is created: the gateway's builder makes it)."""
    if section.operator_token is not None:
        return section.operator_token
    path = operator_token_path(state_dir)
    return SecretStr(path.read_text().strip()) if path.is_file() else None


def operator_headers(section: HttpSection, state_dir: Path) -> dict[str, str]:
    """`Authorization: Bearer <operator token>` for the operator's views; empty when no token is found."""
    token = find_operator_token(section, state_dir)
    return {"Authorization": f"Bearer {token.get_secret_value()}"} if token is not None else {}
