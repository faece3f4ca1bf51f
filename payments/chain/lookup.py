"""Address lookup tables for v0 payout transactions: payees are referenced by a 1-byte index.

Tables are owned by the treasury. Their addresses are written to the ledger before the creating
transaction is sent; extending is idempotent (the table is read back and only missing addresses are
added); new entries are usable from the slot after the extension, so `ensure` waits for it.
"""

import logging
import struct
import time

from solders.address_lookup_table_account import (
    LOOKUP_TABLE_MAX_ADDRESSES,
    AddressLookupTable,
    AddressLookupTableAccount,
)
from solders.keypair import Keypair
from solders.message import Message
from solders.pubkey import Pubkey
from solders.solders import create_lookup_table, extend_lookup_table
from solders.sysvar import SLOT_HASHES
from solders.transaction import Transaction
from sqlalchemy import Engine, delete, select

from payments.chain.base import ChainBackend
from payments.errors import ChainError
from payments.ledger.schema import lookup_tables

logger = logging.getLogger(__name__)
EXTEND_CHUNK = 20  # addresses per extend transaction (32 bytes each, within the packet limit)


class LookupTables:
    """The treasury's lookup tables, kept in the ledger database and on chain."""

    def __init__(self, engine: Engine, chain: ChainBackend, treasury: Keypair) -> None:
        self.engine = engine
        self.chain = chain
        self.treasury = treasury

    async def ensure(self, addresses: list[Pubkey]) -> list[AddressLookupTableAccount]:
        """Tables that together hold every address in `addresses`, active in the current slot."""
        tables = await self._load()
        present = {a for t in tables for a in t.addresses}
        missing = [a for a in dict.fromkeys(addresses) if a not in present]
        last_extended = -1
        while missing:
            table = next((t for t in tables if len(t.addresses) < LOOKUP_TABLE_MAX_ADDRESSES), None)
            if table is None:
                table = await self._create()
                tables.append(table)
            room = LOOKUP_TABLE_MAX_ADDRESSES - len(table.addresses)
            chunk, missing = missing[: min(room, EXTEND_CHUNK)], missing[min(room, EXTEND_CHUNK) :]
            await self._send(
                [
                    extend_lookup_table(
                        {
                            "lookup_table_address": table.key,
                            "authority_address": self.treasury.pubkey(),
                            "payer_address": self.treasury.pubkey(),
                            "new_addresses": chunk,
                        }
                    )
                ]
            )
            last_extended = max(last_extended, await self.chain.slot())
            tables = await self._load()
        if last_extended >= 0:
            await self.chain.wait_for_slot_after(last_extended)
        return tables

    async def _load(self) -> list[AddressLookupTableAccount]:
        with self.engine.begin() as conn:
            keys = conn.execute(select(lookup_tables.c.address).order_by(lookup_tables.c.created_at)).scalars().all()
        tables = []
        for key in keys:
            pubkey = Pubkey.from_string(key)
            data = await self.chain.account_data(pubkey)
            if data is None:  # the creating transaction never landed (crash, expiry): forget it
                with self.engine.begin() as conn:
                    conn.execute(delete(lookup_tables).where(lookup_tables.c.address == key))
                continue
            tables.append(AddressLookupTableAccount(pubkey, AddressLookupTable.deserialize(data).addresses))
        return tables

    async def _create(self) -> AddressLookupTableAccount:
        recent_slot = await self._recent_slot()
        ix, address = create_lookup_table(
            {
                "authority_address": self.treasury.pubkey(),
                "payer_address": self.treasury.pubkey(),
                "recent_slot": recent_slot,
            }
        )
        with self.engine.begin() as conn:
            if conn.execute(select(lookup_tables).where(lookup_tables.c.address == str(address))).first() is None:
                conn.execute(lookup_tables.insert(), {"address": str(address), "created_at": time.time()})
        if await self.chain.account_data(address) is None:
            await self._send([ix])
        # A second table needs a different recent slot (the address derives from it).
        await self.chain.wait_for_slot_after(await self.chain.slot())
        logger.info("lookup table %s created", address)
        return AddressLookupTableAccount(address, [])

    async def _recent_slot(self) -> int:
        data = await self.chain.account_data(SLOT_HASHES)
        if data is None or len(data) < 16:
            raise ChainError("cannot read the SlotHashes sysvar")
        (count,) = struct.unpack_from("<Q", data)
        if count == 0:
            raise ChainError("SlotHashes is empty")
        return struct.unpack_from("<Q", data, 8)[0]  # most recent first

    async def _send(self, ixs: list) -> None:  # type: ignore[type-arg]
        blockhash, _ = await self.chain.latest_blockhash()
        tx = Transaction(
            [self.treasury],
            Message.new_with_blockhash(ixs, self.treasury.pubkey(), blockhash),
            blockhash,
        )
        await self.chain.send_raw(bytes(tx))
        status = None
        for _ in range(100):
            status = await self.chain.signature_status(tx.signatures[0])
            if status is not None and status.reached("confirmed"):
                break
            await self.chain.wait_for_slot_after(await self.chain.slot())
        if status is None or status.err is not None:
            raise ChainError(f"lookup table transaction failed: {status.err if status else 'not landed'}")
