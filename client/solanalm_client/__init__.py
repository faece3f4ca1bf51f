"""Python SDK of a SolanaLM network: sign in with a Solana keypair, pay for inference, read receipts.

from solanalm_client import SolanaLMClient, AsyncSolanaLMClient
"""

from solanalm_client.aio import AsyncInferenceStream, AsyncSolanaLMClient
from solanalm_client.api import SETTLEMENT_HEADER, RetryPolicy
from solanalm_client.errors import (
    AuthenticationError,
    ConnectionFailed,
    InsufficientBalance,
    KeypairError,
    NotFound,
    PermissionDenied,
    RateLimited,
    ServiceUnavailable,
    SolanaLMError,
)
from solanalm_client.models import (
    ApiKey,
    Balance,
    Deposit,
    DepositInfo,
    Earnings,
    InferenceResult,
    KeyInfo,
    Payout,
    ProviderNode,
    ProviderStatus,
    Receipt,
    ShareLine,
    Usage,
)
from solanalm_client.sync_client import InferenceStream, SolanaLMClient
from solanalm_client.wallet import deposit_transaction, load_keypair

__all__ = [
    "SETTLEMENT_HEADER",
    "ApiKey",
    "AsyncInferenceStream",
    "AsyncSolanaLMClient",
    "AuthenticationError",
    "Balance",
    "ConnectionFailed",
    "Deposit",
    "DepositInfo",
    "Earnings",
    "InferenceResult",
    "InferenceStream",
    "InsufficientBalance",
    "KeyInfo",
    "KeypairError",
    "NotFound",
    "Payout",
    "PermissionDenied",
    "ProviderNode",
    "ProviderStatus",
    "RateLimited",
    "Receipt",
    "RetryPolicy",
    "ServiceUnavailable",
    "ShareLine",
    "SolanaLMClient",
    "SolanaLMError",
    "Usage",
    "deposit_transaction",
    "load_keypair",
]
