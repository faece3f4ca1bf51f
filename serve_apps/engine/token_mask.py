"""Applying a grammar's token mask where tokens are sampled (pure torch: every last stage, provider ones too).

A mask is the allowed-next-token bitmask of one sequence as packed little-endian int32 words: bit `i % 32`
of word `i // 32` is set when token `i` may come next (xgrammar's and llguidance's layout, so the
coordinator sends what its matcher fills, unchanged). Logits past the mask's end (a vocabulary padded
beyond the tokenizer's) are never allowed.
"""

import numpy as np
import torch


def mask_words(vocab_size: int) -> int:
    """int32 words of a mask over `vocab_size` tokens."""
    return (vocab_size + 31) // 32


def allowed_tokens(mask: bytes, vocab_size: int) -> torch.Tensor:
    """The mask as a bool vector of `vocab_size` entries (False past the mask's end)."""
    # Little-endian words: bit i of the vocabulary is bit i % 8 of byte i // 8 (numpy unpacks in C, ~6x
    # faster than shifting int32 words in torch).
    bits = np.unpackbits(np.frombuffer(mask, dtype=np.uint8), bitorder="little")
    if bits.size < vocab_size:
        bits = np.concatenate([bits, np.zeros(vocab_size - bits.size, dtype=np.uint8)])
    return torch.from_numpy(bits[:vocab_size].view(np.bool_))


def apply_token_masks(logits: torch.Tensor, masks: list[bytes | None]) -> torch.Tensor:
    """`logits` [B, V] with every disallowed token of row i at -inf where `masks[i]` is set (in place).

    A mask that allows nothing (a broken coordinator) leaves its row unchanged rather than sampling from
    nothing; the coordinator's matcher then refuses the token and ends the sequence.
    """
    for row, mask in enumerate(masks):
        if mask is None:
            continue
        allowed = allowed_tokens(mask, logits.shape[-1]).to(logits.device)  # no copy on CPU
        if bool(allowed.any()):
            logits[row].masked_fill_(~allowed, float("-inf"))
    return logits
