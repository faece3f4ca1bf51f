"""The operator's views of a deployed gateway (/healthz?detail=1, /v1/network/nodes?detail=1), read with
the operator token its builder wrote into the deployment's state dir (cluster/security/operator_token.py)."""

import httpx

from cluster.config import Settings
from cluster.security.operator_token import operator_headers


def as_operator(settings: Settings) -> dict[str, str]:
    """`Authorization: Bearer <operator token>` of the gateway deployed with `settings`."""
    headers = operator_headers(settings.http, settings.model.cache_dir / "state")
    if not headers:
        raise AssertionError(f"no operator token in {settings.model.cache_dir / 'state'}: was the app built?")
    return headers


def detail_health(base_url: str, settings: Settings, timeout_s: float = 60) -> httpx.Response:
    """/healthz?detail=1 (pids, node ids, busy seconds, errors) of the gateway at `base_url` (…/v1 or not)."""
    root = base_url.removesuffix("/v1")
    return httpx.get(f"{root}/healthz?detail=1", headers=as_operator(settings), timeout=timeout_s)
