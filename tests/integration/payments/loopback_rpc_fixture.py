"""TEST FIXTURE: a loopback Solana JSON-RPC endpoint that executes transactions on LiteSVM.

It runs in its own (spawned) process, like a local validator would: executing the Associated Token
Account program in solders' LiteSVM makes a later Ray `create_actor` in the same process abort
(std::bad_alloc), so LiteSVM must stay out of the pytest process. Test setup goes through
`loopback_*` control methods on the same endpoint.

Not a validator: it answers the handful of methods the RPC backend uses, with responses produced
by solders' own RPC response types, so solana-py's AsyncClient parses them like a real node's.
Every transaction is final as soon as it executes; `expire_blockhash` moves the block height past
the old blockhash's validity window.
"""

import base64
import json
import multiprocessing
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from solders.keypair import Keypair
from solders.pubkey import Pubkey
from solders.rpc.responses import (
    GetAccountInfoResp,
    GetBalanceResp,
    GetBlockHeightResp,
    GetLatestBlockhashResp,
    GetMinimumBalanceForRentExemptionResp,
    GetSignaturesForAddressResp,
    GetSignatureStatusesResp,
    GetSlotResp,
    RpcBlockhash,
    RpcConfirmedTransactionStatusWithSignature,
    RpcResponseContext,
    SendTransactionResp,
)
from solders.transaction import VersionedTransaction
from solders.transaction_metadata import FailedTransactionMetadata
from solders.transaction_status import TransactionConfirmationStatus, TransactionStatus

from payments.chain.base import BLOCKHASH_VALIDITY_BLOCKS, EXPIRY_JUMP_BLOCKS
from payments.chain.litesvm_backend import LiteSVMBackend
from payments.chain.treasury import bootstrap_litesvm, faucet
from payments.chain.tx import AssetSpec, memo_of


class LoopbackRpcNode:
    """JSON-RPC on 127.0.0.1:<port> over an in-memory LiteSVM; runs inside the fixture's process."""

    def __init__(self) -> None:
        self.backend = LiteSVMBackend(state_path=None)
        self.svm = self.backend.svm
        self.height = 0
        self.landed: dict[str, dict[str, Any]] = {}
        self.calls: list[str] = []
        self.dropped: list[str] = []
        # What getSignatureStatuses reports for landed transactions (a node still confirming them).
        self.confirmation = TransactionConfirmationStatus.Finalized
        # A load balancer in front of a node that lags (statuses "not found") and one far ahead (height).
        self.lagging = False
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> "LoopbackRpcNode":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # JSON-RPC methods ---------------------------------------------------------------------------
    def _context(self) -> RpcResponseContext:
        return RpcResponseContext(int(self.svm.get_clock().slot))

    def call(self, method: str, params: list[Any]) -> str:
        if method.startswith("loopback_"):  # test control, not Solana RPC
            with self._lock:
                result = getattr(self, f"_control_{method[9:]}")(*params)
            return json.dumps({"jsonrpc": "2.0", "result": result, "id": 0})
        self.calls.append(method)
        with self._lock:
            return getattr(self, f"_rpc_{method}")(params)

    # Test control ---------------------------------------------------------------------------------
    def _control_bootstrap(self, treasury_secret: list[int], state_dir: str) -> str | None:
        asset = bootstrap_litesvm(
            self.backend, Keypair.from_bytes(bytes(treasury_secret)), "spl", None, 6, Path(state_dir)
        )
        return None if asset.mint is None else str(asset.mint)

    def _control_faucet(self, treasury_secret: list[int], mint: str, owner: str, amount: int) -> None:
        asset = AssetSpec(Pubkey.from_string(mint), 6)
        faucet(self.backend, Keypair.from_bytes(bytes(treasury_secret)), asset, Pubkey.from_string(owner), amount)

    def _control_expireBlockhash(self) -> None:
        self.svm.expire_blockhash()
        self.height += EXPIRY_JUMP_BLOCKS

    def _control_setLagging(self, lagging: bool) -> None:
        self.lagging = lagging

    def _control_setConfirmation(self, level: str) -> None:
        self.confirmation = {
            "processed": TransactionConfirmationStatus.Processed,
            "confirmed": TransactionConfirmationStatus.Confirmed,
            "finalized": TransactionConfirmationStatus.Finalized,
        }[level]

    def _control_report(self) -> dict[str, list[str]]:
        return {"calls": self.calls, "dropped": self.dropped}

    def _rpc_getLatestBlockhash(self, params: list[Any]) -> str:
        value = RpcBlockhash(self.svm.latest_blockhash(), self.height + BLOCKHASH_VALIDITY_BLOCKS)
        return GetLatestBlockhashResp(value, self._context()).to_json()

    def _rpc_getBlockHeight(self, params: list[Any]) -> str:
        return GetBlockHeightResp(self.height + (10_000 if self.lagging else 0)).to_json()

    def _rpc_getSignaturesForAddress(self, params: list[Any]) -> str:
        address = Pubkey.from_string(params[0])
        options = params[1] if len(params) > 1 else {}
        history = list(reversed(self.landed.items()))
        if options.get("before"):
            history = history[next((i + 1 for i, (s, _) in enumerate(history) if s == options["before"]), 0) :]
        found = []
        for _, entry in history:
            tx = VersionedTransaction.from_bytes(base64.b64decode(entry["tx"]))
            if address in tx.message.account_keys:
                found.append(
                    RpcConfirmedTransactionStatusWithSignature(
                        tx.signatures[0],
                        entry["slot"],
                        entry["err"],
                        memo_of(tx),
                        None,
                        TransactionConfirmationStatus.Finalized,
                    )
                )
        return GetSignaturesForAddressResp(found[: int(options.get("limit") or 1000)]).to_json()

    def _rpc_getSlot(self, params: list[Any]) -> str:
        # Each poll of the slot moves LiteSVM one slot on, as a running cluster would.
        slot = int(self.svm.get_clock().slot)
        self.backend.advance_slot()
        return GetSlotResp(slot).to_json()

    def _rpc_getBalance(self, params: list[Any]) -> str:
        return GetBalanceResp(int(self.svm.get_balance(Pubkey.from_string(params[0])) or 0), self._context()).to_json()

    def _rpc_getAccountInfo(self, params: list[Any]) -> str:
        return GetAccountInfoResp(self.svm.get_account(Pubkey.from_string(params[0])), self._context()).to_json()

    def _rpc_getMinimumBalanceForRentExemption(self, params: list[Any]) -> str:
        return GetMinimumBalanceForRentExemptionResp(
            int(self.svm.minimum_balance_for_rent_exemption(params[0]))
        ).to_json()

    def _rpc_sendTransaction(self, params: list[Any]) -> str:
        tx = VersionedTransaction.from_bytes(base64.b64decode(params[0]))
        signature = str(tx.signatures[0])
        # With preflight skipped a node answers with the signature whatever happens; a duplicate
        # or a transaction with an unknown blockhash is silently dropped and never lands.
        if signature in self.landed:
            return SendTransactionResp(tx.signatures[0]).to_json()
        result = self.svm.send_transaction(tx)
        if isinstance(result, FailedTransactionMetadata):
            err, fee = result.err(), int(result.meta().fee())
            if "BlockhashNotFound" in str(err) or "AlreadyProcessed" in str(err):
                self.dropped.append(signature)
                return SendTransactionResp(tx.signatures[0]).to_json()
        else:
            err, fee = None, int(result.fee())
        self.landed[signature] = {
            "tx": params[0],
            "err": err,
            "fee": fee,
            "slot": int(self.svm.get_clock().slot),
        }
        return SendTransactionResp(tx.signatures[0]).to_json()

    def _rpc_getSignatureStatuses(self, params: list[Any]) -> str:
        statuses = []
        for signature in params[0]:
            entry = None if self.lagging else self.landed.get(signature)
            statuses.append(
                None
                if entry is None
                else TransactionStatus(
                    entry["slot"],
                    None,
                    entry["err"],
                    entry["err"],
                    self.confirmation,
                )
            )
        return GetSignatureStatusesResp(statuses, self._context()).to_json()

    def _rpc_getTransaction(self, params: list[Any]) -> str:
        entry = self.landed.get(params[0])
        if entry is None:
            return json.dumps({"jsonrpc": "2.0", "result": None, "id": 0})
        err = (
            None
            if entry["err"] is None
            else json.loads(
                GetSignatureStatusesResp(
                    [TransactionStatus(0, None, entry["err"], entry["err"], None)],
                    RpcResponseContext(0),
                ).to_json()
            )["result"]["value"][0]["err"]
        )
        meta = {
            "err": err,
            "status": {"Ok": None} if err is None else {"Err": err},
            "fee": entry["fee"],
            "preBalances": [],
            "postBalances": [],
            "innerInstructions": [],
            "logMessages": [],
            "preTokenBalances": [],
            "postTokenBalances": [],
            "rewards": [],
            "loadedAddresses": {"writable": [], "readonly": []},
            "computeUnitsConsumed": 0,
        }
        result = {
            "slot": entry["slot"],
            "transaction": [entry["tx"], "base64"],
            "meta": meta,
            "version": "legacy",
            "blockTime": None,
        }
        return json.dumps({"jsonrpc": "2.0", "result": result, "id": 0})

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        validator = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server API
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                body = json.loads(validator.call(request["method"], request.get("params") or []))
                body["id"] = request.get("id", 0)
                raw = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args: Any) -> None:
                return None

        return Handler


__all__ = ["LoopbackRpcValidator"]


def _serve(conn: Any) -> None:
    node = LoopbackRpcNode().start()
    conn.send(node._server.server_address[1])
    node._thread.join()


class LoopbackRpcValidator:
    """Handle of the fixture process: its URL and the test-control calls."""

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._parent, child = ctx.Pipe()
        self._process = ctx.Process(target=_serve, args=(child,), daemon=True)
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "LoopbackRpcValidator":
        self._process.start()
        if not self._parent.poll(60):
            raise RuntimeError("loopback RPC fixture did not start")
        self.port = int(self._parent.recv())
        return self

    def stop(self) -> None:
        self._process.terminate()
        self._process.join(10)

    def control(self, method: str, *params: Any) -> Any:
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": f"loopback_{method}", "params": list(params)})
        request = urllib.request.Request(self.url, body.encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())["result"]

    def bootstrap(self, treasury: Keypair, state_dir: Path) -> str:
        """Fund the treasury, create the mint and the treasury's token account; returns the mint."""
        return str(self.control("bootstrap", list(bytes(treasury)), str(state_dir)))

    def faucet(self, treasury: Keypair, mint: str, owner: Pubkey, amount: int) -> None:
        self.control("faucet", list(bytes(treasury)), mint, str(owner), amount)

    def expire_blockhash(self) -> None:
        self.control("expireBlockhash")

    def set_confirmation(self, level: str) -> None:
        self.control("setConfirmation", level)

    def set_lagging(self, lagging: bool) -> None:
        """Statuses come from a node that never saw the transactions, block heights from one far ahead."""
        self.control("setLagging", lagging)

    @property
    def calls(self) -> list[str]:
        return list(self.control("report")["calls"])

    @property
    def dropped(self) -> list[str]:
        return list(self.control("report")["dropped"])
