"""The operator's views of the gateway: `/healthz?detail=1` and `/v1/network/nodes?detail=1` answer with the
pids, node ids, endpoints and exception text that anonymous callers must not see (a map of the cluster to
attack, and errors that name paths and hosts). They need `Authorization: Bearer <operator token>`
(cluster/security/operator_token.py: `http.operator_token`, else <state dir>/operator-token)."""

import secrets

from pydantic import SecretStr

from serve_apps.gateway.errors import OpenAIError


def require_operator(token: SecretStr | None, authorization: str | None) -> None:
    """401 unless `authorization` is `Bearer <token>` (compared in constant time); a gateway built without a
    token (in-process apps) shows no detail at all."""
    scheme, _, given = (authorization or "").partition(" ")
    expected = token.get_secret_value() if token is not None else ""
    if not expected or scheme.lower() != "bearer" or not secrets.compare_digest(given.strip(), expected):
        raise OpenAIError(
            401,
            "this view needs the operator token as `Authorization: Bearer <token>` (`solanalm operator-token`)",
            code="invalid_operator_token",
            headers={"WWW-Authenticate": "Bearer"},
        )
