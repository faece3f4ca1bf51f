"""The two JSON-RPC calls a client needs to send its own deposit to a Solana cluster (no solana-py)."""

from __future__ import annotations

import base64
from typing import Any

import httpx

from solanalm_client.errors import SolanaLMError


def send_params(tx: bytes) -> dict[str, Any]:
    encoded = base64.b64encode(tx).decode()
    return {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "sendTransaction",
        "params": [encoded, {"encoding": "base64", "preflightCommitment": "confirmed"}],
    }


def confirm_params(signature: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": 1, "method": "getSignatureStatuses", "params": [[signature]]}


def parse_rpc(response: httpx.Response) -> Any:
    try:
        body = response.json()
    except ValueError:
        raise SolanaLMError(f"the RPC node answered {response.status_code} with non-JSON", code="rpc_error") from None
    if not isinstance(body, dict) or "error" in body or "result" not in body:
        error = body.get("error") if isinstance(body, dict) else body
        raise SolanaLMError(f"RPC error: {error}", code="rpc_error")
    return body["result"]
