"""PaymentsService: ledger + auth + chain + settlement behind one object (the actor wraps it).

Plain Python, no Ray: tests and the CLI use it directly; `payments.actor` serves it to the gateway.
"""

import csv
import logging
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import TextIO

from solders.keypair import Keypair
from solders.pubkey import Pubkey
from solders.signature import Signature
from solders.transaction import VersionedTransaction
from spl.token.instructions import get_associated_token_address
from sqlalchemy import select

from cluster.config.payments import PaymentsSection
from payments.auth import WalletAuth
from payments.catchup import catch_up
from payments.chain.base import ChainBackend
from payments.chain.deposits import deposit_of
from payments.chain.litesvm_backend import LiteSVMBackend
from payments.chain.lookup import LookupTables
from payments.chain.shared import SharedLiteSVMBackend
from payments.chain.treasury import bootstrap_litesvm, faucet, load_or_create_keypair
from payments.chain.tx import AssetSpec, BudgetSpec
from payments.errors import Forbidden, InvalidRequest, PaymentError
from payments.ledger.lease import LeaseLost, SettlementLease
from payments.ledger.ledger import Ledger, SplitPolicy, make_engine
from payments.ledger.payouts import PayoutBook
from payments.ledger.reconcile import ledger_checks
from payments.ledger.schema import payout_batches, payout_items, settlement_shares, settlements
from payments.ledger.withholding import withhold_payout
from payments.pricing import Price
from payments.protocol import (
    ApiKey,
    ApiKeyInfo,
    Balance,
    BatchReport,
    Challenge,
    Deposit,
    DepositInfo,
    DepositRequest,
    Hold,
    HoldRequest,
    HoldSweep,
    PayoutStatus,
    Receipt,
    ReceiptQuery,
    ReconcileReport,
    ReleaseHold,
    SettlementRecord,
    SignIn,
    TrainingReward,
    UsageLine,
    UsageReport,
    WalletIdentity,
    WithheldPayout,
    WithholdPayout,
)
from payments.settlement import CrashHook, Settler, SettlerConfig, _no_crash

logger = logging.getLogger(__name__)
OPEN_MODE_WALLET = "open-mode"


class PaymentsService:
    """Everything the gateway and the CLI need; build with `await PaymentsService.create(...)`."""

    def __init__(
        self,
        section: PaymentsSection,
        ledger: Ledger,
        auth: WalletAuth,
        chain: ChainBackend,
        treasury: Keypair,
        asset: AssetSpec,
        crash_hook: CrashHook = _no_crash,
        worker: int = 0,
    ) -> None:
        self.section = section
        # One settlement runner at a time among the workers sharing this ledger. The holder is the worker's
        # slot, not its process: Ray restarts a crashed worker under the same name, which resumes at once.
        self.lease = SettlementLease(ledger.engine, section.worker_actor_name(worker), section.settlement_lease_s)
        self.ledger = ledger
        self.auth = auth
        self.chain = chain
        self.treasury = treasury
        self.asset = asset
        ledger.reserved_payees = frozenset({str(treasury.pubkey())})  # its shares stay network income
        self.book = PayoutBook(ledger, fees_in_ledger=asset.mint is None)
        self.settler = Settler(
            self.book,
            chain,
            treasury,
            asset,
            SettlerConfig(
                section.batch_max_transfers,
                section.min_payout,
                BudgetSpec(section.compute_unit_limit, section.compute_unit_price_micro_lamports),
                section.commitment,
                section.use_versioned_tx,
                section.resign_margin_blocks,
                section.resign_history_limit,
                section.quarantine_backoff_s,
                section.quarantine_backoff_max_s,
            ),
            crash_hook,
            LookupTables(ledger.engine, chain, treasury) if section.use_versioned_tx else None,
            self.lease.ensure,
        )

    @classmethod
    async def create(
        cls,
        section: PaymentsSection,
        chain: ChainBackend | None = None,
        crash_hook: CrashHook = _no_crash,
        worker: int = 0,
    ) -> "PaymentsService":
        """Open the ledger, load the treasury and connect the configured chain backend."""
        state_dir = section.state_dir
        state_dir.mkdir(parents=True, exist_ok=True)
        engine = make_engine(section.resolved_database_url(), section.sqlite_synchronous)
        ledger = Ledger(
            engine,
            _price_lookup(section),
            SplitPolicy(section.network_commission_bps, section.proxy_commission_bps),
        )
        auth = WalletAuth(
            engine, section.siws_domain, section.nonce_ttl_s, section.message_max_age_s, section.api_key_ttl_s
        )
        treasury = load_or_create_keypair(section.treasury_keypair_path or state_dir / "treasury.json")
        if chain is None:
            chain = build_chain(section)
        if isinstance(chain, LiteSVMBackend):
            asset = bootstrap_litesvm(chain, treasury, section.asset, section.mint, section.mint_decimals, state_dir)
        elif isinstance(chain, SharedLiteSVMBackend):
            asset = await chain.bootstrap(treasury, section.asset, section.mint, section.mint_decimals, state_dir)
        elif section.asset == "spl":
            if section.mint is None:
                raise InvalidRequest("payments.mint is required for SPL settlement over RPC")
            asset = AssetSpec(Pubkey.from_string(section.mint), section.mint_decimals)
        else:
            asset = AssetSpec(None, 9)
        return cls(section, ledger, auth, chain, treasury, asset, crash_hook, worker)

    # Gateway path ---------------------------------------------------------------------------------
    def authenticate(self, api_key: str | None) -> WalletIdentity:
        if self.section.open_mode:
            return WalletIdentity(OPEN_MODE_WALLET)
        return self.auth.authenticate(api_key or "")

    def place_hold(self, req: HoldRequest) -> Hold:
        return self.ledger.place_hold(req)

    def report_usage(self, report: UsageReport) -> SettlementRecord:
        result = self.report_usage_many([report])[0]
        if isinstance(result, PaymentError):
            raise result
        return result

    def report_usage_many(self, reports: list[UsageReport]) -> list[SettlementRecord | PaymentError]:
        """Group commit: one durable transaction for many completed requests."""
        return self.ledger.record_usage(reports)

    def record_training_rewards(self, rewards: list[TrainingReward]) -> list[SettlementRecord]:
        """Credit federated-training rewards; they are paid out with the next settlement batches."""
        return self.ledger.record_rewards(rewards)

    def fund_training_rewards(self, ref: str, amount: int) -> int:
        """Fund the rewards account once per `ref` (send the same amount to the treasury); returns its balance."""
        return self.ledger.fund_rewards(ref, amount)

    def release_hold(self, release: ReleaseHold) -> None:
        self.ledger.release_hold(release.request_id)

    def sweep_holds(self, max_age_s: float | None = None) -> HoldSweep:
        """Release holds open longer than `max_age_s` (default payments.hold_max_age_s): orphans no request
        will settle, e.g. a place_hold that committed after the gateway's call to it timed out."""
        sweep = self.ledger.sweep_holds(self.section.hold_max_age_s if max_age_s is None else max_age_s)
        if sweep.request_ids:
            count, ids = len(sweep.request_ids), sweep.request_ids
            logger.warning("released %d orphaned holds (%d base units): %s", count, sweep.amount, ids)
        return sweep

    def withhold_payout(self, req: WithholdPayout) -> WithheldPayout:
        """A failed audit: the named providers' unpaid shares of the request are withheld."""
        result = withhold_payout(self.ledger, req)
        logger.info("withheld %d from %s for %s (%s)", result.amount, result.wallets, req.request_id, req.reason)
        return result

    def get_receipt(self, query: ReceiptQuery) -> Receipt:
        """The record and its on-chain status, for the payer or a paid provider only."""
        record, settled, signatures = self.ledger.settlement(query.settlement_id)
        readers = {record.payer} | {s.wallet for s in record.shares if s.role != "network"}
        if query.reader not in readers:
            raise Forbidden("only the payer and the paid providers may read this receipt")
        return Receipt(record, settled, signatures)

    def balance(self, wallet: str) -> Balance:
        return self.ledger.balance(wallet, "SOL" if self.asset.mint is None else str(self.asset.mint))

    # Sign-in -----------------------------------------------------------------------------------
    def challenge(self, wallet: str) -> Challenge:
        return self.auth.challenge(wallet)

    def verify(self, sign_in: SignIn) -> ApiKey:
        return self.auth.verify(sign_in.message, sign_in.signature, ttl_s=sign_in.ttl_s)

    def revoke_key(self, key_id: str, wallet: str) -> None:
        self.auth.revoke(key_id, wallet)

    def list_keys(self, wallet: str) -> list[ApiKeyInfo]:
        return self.auth.list_keys(wallet)

    # Chain ---------------------------------------------------------------------------------------
    async def deposit(self, req: DepositRequest) -> Deposit:
        """Verify a transfer to the treasury on chain and credit its sender once."""
        try:
            signature = Signature.from_string(req.signature)
        except ValueError as exc:
            raise InvalidRequest("malformed transaction signature") from exc
        fetched = await self.chain.fetch_transaction(signature)
        if fetched is None:
            raise InvalidRequest("transaction not found on chain (yet)", code="deposit_not_found")
        wallet, amount = deposit_of(fetched, self.treasury.pubkey(), self.asset)
        return self.ledger.credit_deposit(req.signature, wallet, amount, fetched.slot)

    async def deposit_info(self) -> DepositInfo:
        blockhash, _ = await self.chain.latest_blockhash()
        mint = None if self.asset.mint is None else str(self.asset.mint)
        return DepositInfo(
            str(self.treasury.pubkey()),
            mint,
            self.asset.decimals,
            str(blockhash),
            self.section.chain_backend,
        )

    async def submit_transaction(self, tx_bytes: bytes) -> str:
        """Relay a client-signed transaction (e.g. a deposit) to the chain; return its signature.

        LiteSVM only: on a real cluster the client sends its own transaction (no relaying of
        arbitrary transactions through the treasury's RPC endpoint) and gives its signature.
        """
        if not isinstance(self.chain, LiteSVMBackend | SharedLiteSVMBackend):
            raise InvalidRequest(
                f"relaying transactions is for the litesvm backend only; this network settles on"
                f" {self.section.chain_backend}: send the transfer to the treasury yourself and give its"
                " signature",
                code="relay_unsupported",
            )
        try:
            signature = VersionedTransaction.from_bytes(tx_bytes).signatures[0]
        except ValueError as exc:
            raise InvalidRequest("not a serialized Solana transaction") from exc
        await self.chain.send_raw(tx_bytes)
        return str(signature)

    async def faucet(self, wallet: str, amount: int) -> None:
        """LiteSVM only (embedded demo, tests): fund a wallet with SOL and the settlement asset."""
        if isinstance(self.chain, SharedLiteSVMBackend):
            await self.chain.faucet(self.treasury, self.asset, Pubkey.from_string(wallet), amount)
            return
        if not isinstance(self.chain, LiteSVMBackend):
            raise InvalidRequest("the faucet exists only on the litesvm backend")
        faucet(self.chain, self.treasury, self.asset, Pubkey.from_string(wallet), amount)

    async def settle(self) -> BatchReport:
        """One settle pass, if this worker holds (or takes) the settlement lease; else nothing is done."""
        return await self._leased(self.settler.settle)

    async def recover(self) -> BatchReport:
        """Finish the batches a dead runner left open, if this worker holds (or takes) the lease; first adopt
        the payouts the chain made that the ledger lacks (a restored backup: payments/catchup.py)."""
        return await self._leased(self._catch_up_and_recover)

    async def _catch_up_and_recover(self) -> BatchReport:
        await catch_up(self.book, self.chain, self.treasury.pubkey(), self.asset, self.section.resign_history_limit)
        return await self.settler.recover()

    async def _leased(self, run: Callable[[], Awaitable[BatchReport]]) -> BatchReport:
        if not self.lease.acquire():
            state = self.lease.state()
            logger.info("settlement lease held by %s: not settling", state.holder if state else "?")
            return self._idle_report()
        try:
            return await run()
        except LeaseLost as exc:  # it expired under this pass and another worker took it: stop, sending nothing
            logger.warning("stopped settling: %s", exc)
            return self._idle_report()

    def _idle_report(self) -> BatchReport:
        return BatchReport(0, 0, 0, len(self.book.open_batches()), 0)

    async def treasury_balance(self) -> int:
        if self.asset.mint is None:
            return await self.chain.lamports(self.treasury.pubkey())
        ata = get_associated_token_address(self.treasury.pubkey(), self.asset.mint)
        return await self.chain.token_amount(ata) or 0

    async def reconcile(self) -> ReconcileReport:
        """Double-entry checks, every confirmed batch landed cleanly, the treasury is solvent."""
        checks, figures = ledger_checks(self.ledger, self.section.hold_max_age_s)
        landed = True
        for batch in self.book.confirmed_batches():
            status = await self.chain.signature_status(Signature.from_string(batch.signature or ""))
            landed = landed and status is not None and status.err is None
        checks["confirmed_batches_landed"] = landed
        treasury = await self.treasury_balance()
        figures["treasury_onchain"] = treasury
        checks["treasury_covers_liabilities"] = treasury >= figures["liabilities"]
        return ReconcileReport(all(checks.values()), checks, figures)

    def pending(self) -> dict[str, object]:
        """Unpaid earnings, open batches and quarantined payees (a transfer to them failed on chain)."""
        return {
            "unpaid": self.book.unpaid(),
            "open_batches": [(b.batch_id, b.state, b.signature) for b in self.book.open_batches()],
            "quarantined": [asdict(q) for q in self.book.quarantined()],
        }

    def payouts(self, wallet: str, limit: int = 100) -> list[PayoutStatus]:
        """`wallet`'s payout lines, newest batch first, with each batch's state and transaction signature."""
        query = (
            select(payout_items.c.batch_id, payout_items.c.amount, payout_batches)
            .join(payout_batches, payout_items.c.batch_id == payout_batches.c.id)
            .where(payout_items.c.wallet == wallet)
            .order_by(payout_batches.c.created_at.desc())
            .limit(limit)
        )
        with self.ledger.transaction() as conn:
            rows = conn.execute(query).all()
        return [
            PayoutStatus(r.batch_id, wallet, int(r.amount), r.state, r.signature, r.created_at, r.updated_at)
            for r in rows
        ]

    def usage(self, wallet: str, limit: int = 100) -> list[UsageLine]:
        """The requests `wallet` paid for, newest first: each one's settlement id (its receipt), tokens, cost."""
        query = select(settlements).where(settlements.c.payer == wallet).order_by(settlements.c.created_at.desc())
        with self.ledger.transaction() as conn:
            rows = conn.execute(query.limit(limit)).all()
        return [
            UsageLine(r.id, r.request_id, r.model, r.prompt_tokens, r.completion_tokens, int(r.cost), r.created_at)
            for r in rows
        ]

    def release_quarantine(self, wallet: str) -> bool:
        """Operator: retry a quarantined payee in the next settle pass; False if it was not quarantined."""
        return self.book.release_quarantine(wallet)

    def export_csv(self, out: TextIO) -> int:
        """One CSV row per settlement share; returns the number of rows."""
        writer = csv.writer(out)
        writer.writerow(
            [
                "settlement_id",
                "request_id",
                "payer",
                "model",
                "prompt_tokens",
                "completion_tokens",
                "cost",
                "created_at",
                "wallet",
                "role",
                "layers_served",
                "amount",
                "batch_id",
            ]
        )
        count = 0
        with self.ledger.transaction() as conn:
            rows = conn.execute(
                select(
                    settlements,
                    settlement_shares.c.wallet,
                    settlement_shares.c.role,
                    settlement_shares.c.layers_served,
                    settlement_shares.c.amount,
                    settlement_shares.c.batch_id,
                )
                .join(settlement_shares, settlement_shares.c.settlement_id == settlements.c.id)
                .order_by(settlements.c.created_at, settlement_shares.c.id)
            )
            for r in rows:
                writer.writerow(
                    [
                        r.id,
                        r.request_id,
                        r.payer,
                        r.model,
                        r.prompt_tokens,
                        r.completion_tokens,
                        r.cost,
                        r.created_at,
                        r.wallet,
                        r.role,
                        r.layers_served,
                        r.amount,
                        r.batch_id,
                    ]
                )
                count += 1
        return count

    async def close(self) -> None:
        self.lease.release()
        await self.chain.close()
        self.ledger.engine.dispose()


def _price_lookup(section: PaymentsSection):  # type: ignore[no-untyped-def]
    def price_of(model: str) -> Price:
        if section.open_mode:
            return Price(0, 0)
        p = section.price_for(model)
        return Price(p.prompt_per_1k, p.completion_per_1k)

    return price_of


def build_chain(section: PaymentsSection) -> ChainBackend:
    """The configured backend: LiteSVM persisted in state_dir, or JSON-RPC."""
    if section.chain_backend == "litesvm":
        return LiteSVMBackend(Path(section.state_dir) / "litesvm.json")
    from payments.chain.rpc_backend import RpcBackend

    return RpcBackend(section.rpc_url, section.commitment, section.rpc_timeout_s)


__all__ = ["OPEN_MODE_WALLET", "PaymentsService", "build_chain"]
