"""Which wallet strings can be paid: checked where usage is recorded, without a chain round trip.

A payee must be a canonical base58 32-byte address on the ed25519 curve (an off-curve address, such as a
program-derived one, has no private key), and neither a well-known program or sysvar id nor a reserved
address (the treasury). Whether an on-curve address holds a deployed program or an account that cannot
receive the settlement asset needs the chain; settlement finds that out when a transfer fails and
quarantines the line (payments.settlement).
"""

from solders.pubkey import Pubkey

# Builtin programs, SPL programs and sysvars a share could name by mistake. Most builtins are off the
# curve anyway; System, Stake, Config, NativeLoader, Feature, the SPL programs and Memo are on it.
KNOWN_PROGRAM_IDS = frozenset(
    {
        "11111111111111111111111111111111",  # System
        "ComputeBudget111111111111111111111111111111",
        "Vote111111111111111111111111111111111111111",
        "Stake11111111111111111111111111111111111111",
        "StakeConfig11111111111111111111111111111111",
        "Config1111111111111111111111111111111111111",
        "Feature111111111111111111111111111111111111",
        "NativeLoader1111111111111111111111111111111",
        "BPFLoader1111111111111111111111111111111111",
        "BPFLoader2111111111111111111111111111111111",
        "BPFLoaderUpgradeab1e11111111111111111111111",
        "LoaderV411111111111111111111111111111111111",
        "AddressLookupTab1e1111111111111111111111111",
        "Ed25519SigVerify111111111111111111111111111",
        "KeccakSecp256k11111111111111111111111111111",
        "Secp256r1SigVerify1111111111111111111111111",
        "ZkE1Gama1Proof11111111111111111111111111111",
        "ZkTokenProof1111111111111111111111111111111",
        "1nc1nerator11111111111111111111111111111111",  # burns whatever it receives
        "TokenkegQfeZyiNwAJbNbGKPFXCWuBvf9Ss623VQ5DA",  # SPL Token
        "TokenzQdBNbLqP5VEhdkAS6EPFLC1PHnBqCXEpPxuEb",  # Token-2022
        "ATokenGPvbdGVxr1b2hvZbsiqW5xWH25efTNsLJA8knL",  # Associated Token Account
        "Memo1UhkJRfHyvLMcVucJwxXeuD728EqVDDwQDxFMNo",
        "MemoSq4gqABAXKb96qnH8TysNcWxMyWCqXgDLGmfcHr",
        "SysvarC1ock11111111111111111111111111111111",
        "SysvarEpochSchedu1e111111111111111111111111",
        "SysvarEpochRewards1111111111111111111111111",
        "Sysvar1nstructions1111111111111111111111111",
        "SysvarLastRestartS1ot1111111111111111111111",
        "SysvarRecentB1ockHashes11111111111111111111",
        "SysvarRent111111111111111111111111111111111",
        "SysvarRewards111111111111111111111111111111",
        "SysvarS1otHashes111111111111111111111111111",
        "SysvarS1otHistory11111111111111111111111111",
        "SysvarStakeHistory1111111111111111111111111",
        "SysvarFees111111111111111111111111111111111",
    }
)


def payee_problem(wallet: str, reserved: frozenset[str] = frozenset()) -> str | None:
    """Why `wallet` cannot be paid, or None when it can (as far as can be told off chain)."""
    try:
        key = Pubkey.from_string(wallet)
    except ValueError:
        return "not a base58 32-byte address"
    if str(key) != wallet:
        return "not the canonical base58 spelling of an address"
    if wallet in KNOWN_PROGRAM_IDS:
        return "a program or sysvar id"
    if wallet in reserved:
        return "a reserved address (the treasury)"
    if not key.is_on_curve():
        return "off the ed25519 curve (no private key can sign for it)"
    return None
