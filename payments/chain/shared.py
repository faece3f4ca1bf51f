"""One LiteSVM chain shared by several payments workers: a named Ray actor holds it, workers reach it by handle.

LiteSVM runs inside one process, so two payments workers each opening `state_dir/litesvm.json` would run two
diverging chains (a deposit seen by one, a payout sent on the other). With `payments.workers > 1` on the
litesvm backend the chain lives in this actor on the head instead, and every worker's `SharedLiteSVMBackend`
forwards the ChainBackend calls to it (the RPC backend needs nothing of this: the validator is the shared
chain).
"""

from pathlib import Path
from typing import Any

from solders.hash import Hash
from solders.keypair import Keypair
from solders.pubkey import Pubkey
from solders.signature import Signature

from payments.chain.base import SIGNATURES_PAGE_MAX, FetchedTransaction, SignatureInfo, SignatureStatus
from payments.chain.litesvm_backend import LiteSVMBackend
from payments.chain.treasury import bootstrap_litesvm, faucet
from payments.chain.tx import AssetSpec

CHAIN_METHODS = frozenset(
    {
        "latest_blockhash",
        "block_height",
        "send_raw",
        "signature_status",
        "signatures_for_address",
        "fetch_transaction",
        "lamports",
        "token_amount",
        "account_data",
        "slot",
        "wait_for_slot_after",
        "rent_exempt_minimum",
    }
)


class LiteSVMChainActor:
    """Ray actor class holding the one LiteSVMBackend (persisted in `state_path`) of a multi-worker deployment."""

    def __init__(self, state_path: str) -> None:
        self.backend = LiteSVMBackend(Path(state_path))

    async def call(self, method: str, *args: Any) -> Any:
        if method not in CHAIN_METHODS:
            raise ValueError(f"{method} is not a chain backend call")
        return await getattr(self.backend, method)(*args)

    def bootstrap(self, treasury: bytes, asset: str, mint: str | None, decimals: int, state_dir: str) -> AssetSpec:
        return bootstrap_litesvm(self.backend, Keypair.from_bytes(treasury), asset, mint, decimals, Path(state_dir))

    def faucet(self, treasury: bytes, asset: AssetSpec, owner: str, amount: int) -> None:
        faucet(self.backend, Keypair.from_bytes(treasury), asset, Pubkey.from_string(owner), amount)

    def expire_blockhash(self) -> None:
        self.backend.expire_blockhash()

    def save(self) -> None:
        self.backend.save()


def start_chain_actor(name: str, state_path: Path, namespace: str | None = None) -> Any:
    """Start (or get) the named detached chain actor on the head (its snapshot is on the head's disk)."""
    import ray

    remote_cls = ray.remote(LiteSVMChainActor).options(  # type: ignore[attr-defined]
        name=name,
        namespace=namespace,
        lifetime="detached",
        get_if_exists=True,
        max_restarts=-1,
        num_cpus=0,
        resources={"node:__internal_head__": 0.001},
    )
    return remote_cls.remote(str(state_path))


class SharedLiteSVMBackend:
    """A ChainBackend over the chain actor's handle; every call awaits the actor (calls are serialised there)."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    async def _call(self, method: str, *args: Any) -> Any:
        return await self.handle.call.remote(method, *args)

    async def latest_blockhash(self) -> tuple[Hash, int]:
        blockhash, last_valid = await self._call("latest_blockhash")
        return blockhash, int(last_valid)

    async def block_height(self, commitment: str | None = None) -> int:
        return int(await self._call("block_height", commitment))

    async def send_raw(self, tx: bytes) -> None:
        await self._call("send_raw", tx)

    async def signature_status(self, signature: Signature) -> SignatureStatus | None:
        return await self._call("signature_status", signature)  # type: ignore[no-any-return]

    async def signatures_for_address(
        self, address: Pubkey, before: str | None = None, limit: int = SIGNATURES_PAGE_MAX
    ) -> list[SignatureInfo]:
        return list(await self._call("signatures_for_address", address, before, limit))

    async def fetch_transaction(self, signature: Signature) -> FetchedTransaction | None:
        return await self._call("fetch_transaction", signature)  # type: ignore[no-any-return]

    async def lamports(self, address: Pubkey) -> int:
        return int(await self._call("lamports", address))

    async def token_amount(self, token_account: Pubkey) -> int | None:
        amount = await self._call("token_amount", token_account)
        return None if amount is None else int(amount)

    async def account_data(self, address: Pubkey) -> bytes | None:
        return await self._call("account_data", address)  # type: ignore[no-any-return]

    async def slot(self) -> int:
        return int(await self._call("slot"))

    async def wait_for_slot_after(self, slot: int) -> None:
        await self._call("wait_for_slot_after", slot)

    async def rent_exempt_minimum(self, data_len: int) -> int:
        return int(await self._call("rent_exempt_minimum", data_len))

    async def close(self) -> None:
        await self.handle.save.remote()  # the actor outlives this worker: persist, do not stop it

    async def bootstrap(
        self, treasury: Keypair, asset: str, mint: str | None, decimals: int, state_dir: Path
    ) -> AssetSpec:
        return await self.handle.bootstrap.remote(bytes(treasury), asset, mint, decimals, str(state_dir))  # type: ignore[no-any-return]

    async def faucet(self, treasury: Keypair, asset: AssetSpec, owner: Pubkey, amount: int) -> None:
        await self.handle.faucet.remote(bytes(treasury), asset, str(owner), amount)
