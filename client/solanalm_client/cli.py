"""`solanalm-client`: the SDK from a shell. Every error is one line on stderr and exit status 2, no traceback.

solanalm-client --url http://127.0.0.1:8000 --keypair ~/.config/solana/id.json balance
solanalm-client --keypair id.json chat "Hello"        # prints the answer and its settlement id
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, is_dataclass
from typing import Any

from solanalm_client.errors import SolanaLMError
from solanalm_client.sync_client import SolanaLMClient


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="solanalm-client", description="A SolanaLM gateway, as a wallet sees it.")
    parser.add_argument("--url", default=os.environ.get("SOLANALM_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--api-key", default=os.environ.get("SOLANALM_API_KEY"), help="instead of --keypair")
    parser.add_argument("--keypair", help="Solana CLI keypair file; signs in (a new API key) first")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("sign-in", help="sign in and print the new API key")
    sub.add_parser("balance")
    chat = sub.add_parser("chat", help="one chat completion; prints the answer and its settlement id")
    chat.add_argument("prompt")
    chat.add_argument("--model")
    chat.add_argument("--max-tokens", type=int, default=64)
    receipt = sub.add_parser("receipt")
    receipt.add_argument("settlement_id")
    deposit = sub.add_parser("deposit", help="transfer base units to the treasury (needs --keypair)")
    deposit.add_argument("amount", type=int)
    deposit.add_argument("--rpc-url", help="send it yourself to this RPC node (default: the gateway relays it)")
    keys = sub.add_parser("keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    keys_sub.add_parser("list")
    revoke = keys_sub.add_parser("revoke")
    revoke.add_argument("key_id")
    sub.add_parser("payouts")
    sub.add_parser("earnings")
    status = sub.add_parser("provider-status")
    status.add_argument("--wallet")
    return parser


def _commands(args: argparse.Namespace) -> dict[str, Callable[[SolanaLMClient], Any]]:
    return {
        "balance": lambda c: c.balance(),
        "chat": lambda c: c.inference(args.prompt, model=args.model, max_tokens=args.max_tokens),
        "receipt": lambda c: c.receipt(args.settlement_id),
        "deposit": lambda c: c.deposit(args.amount, rpc_url=args.rpc_url),
        "keys": lambda c: c.list_keys() if args.keys_command == "list" else {"revoked": c.revoke_key(args.key_id)},
        "payouts": lambda c: c.payouts(),
        "earnings": lambda c: c.earnings(),
        "provider-status": lambda c: c.provider_status(args.wallet),
    }


def _jsonable(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        out = asdict(value)
        out.pop("response", None)
        out.pop("raw", None)
        return out
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def run(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        with SolanaLMClient(args.url, args.api_key) as client:
            key = client.sign_in(args.keypair) if args.keypair else None
            if args.command == "sign-in":
                if key is None:
                    raise SolanaLMError("sign-in needs --keypair", code="no_keypair")
                result: Any = {"id": key.id, "wallet": key.wallet, "api_key": key.secret}
            else:
                result = _commands(args)[args.command](client)
    except SolanaLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(_jsonable(result), indent=2, default=str))
    return 0


def main() -> None:
    sys.exit(run())
