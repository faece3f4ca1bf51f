"""Building a client's deposit: a transfer of SOL or the configured SPL token to the network treasury."""

from solders.instruction import Instruction
from solders.keypair import Keypair
from solders.message import Message
from solders.pubkey import Pubkey
from solders.system_program import TransferParams, transfer
from solders.transaction import Transaction
from spl.token.constants import TOKEN_PROGRAM_ID
from spl.token.instructions import get_associated_token_address, transfer_checked
from spl.token.models import TransferCheckedParams

from payments.chain.tx import AssetSpec
from payments.service import PaymentsService


def deposit_instruction(payer: Pubkey, treasury: Pubkey, asset: AssetSpec, amount: int) -> Instruction:
    """A system transfer (SOL) or a checked token transfer between associated token accounts (SPL)."""
    if asset.mint is None:
        return transfer(TransferParams(from_pubkey=payer, to_pubkey=treasury, lamports=amount))
    return transfer_checked(
        TransferCheckedParams(
            program_id=TOKEN_PROGRAM_ID,
            source=get_associated_token_address(payer, asset.mint),
            mint=asset.mint,
            dest=get_associated_token_address(treasury, asset.mint),
            owner=payer,
            amount=amount,
            decimals=asset.decimals,
        )
    )


async def deposit_transaction(service: PaymentsService, payer: Keypair, amount: int) -> bytes:
    """The signed deposit transaction to the service's treasury, on a fresh blockhash."""
    ix = deposit_instruction(payer.pubkey(), service.treasury.pubkey(), service.asset, amount)
    blockhash, _ = await service.chain.latest_blockhash()
    return bytes(Transaction([payer], Message.new_with_blockhash([ix], payer.pubkey(), blockhash), blockhash))
