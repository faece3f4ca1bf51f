"""Applying a grammar's token mask where tokens are sampled (pure torch: every last stage, provider ones too).

A mask is the allowed-next-token bitmask of one sequence as packed little-endian int32 words: bit `i % 32`
of word `i // 32` is set when token `i` may come next (xgrammar's and llguidance's layout, so the
coordinator sends what its matcher fills, unchanged). Logits past the mask's end (a vocabulary padded
beyond the tokenizer's) are never allowed.
"""

import torch

_BITS = torch.arange(32, dtype=torch.int32)


def mask_words(vocab_size: int) -> int:
    """int32 words of a mask over `vocab_size` tokens."""
    return (vocab_size + 31) // 32


def allowed_tokens(mask: bytes, vocab_size: int) -> torch.Tensor:
    """The mask as a bool vector of `vocab_size` entries (False past the mask's end)."""
    words = torch.frombuffer(bytearray(mask), dtype=torch.int32)
    bits = ((words.unsqueeze(1) >> _BITS) & 1).bool().flatten()
    if bits.numel() >= vocab_size:
        return bits[:vocab_size]
    return torch.cat([bits, torch.zeros(vocab_size - bits.numel(), dtype=torch.bool)])


def apply_token_masks(logits: torch.Tensor, masks: list[bytes | None]) -> torch.Tensor:
    """`logits` [B, V] with every disallowed token of row i at -inf where `masks[i]` is set (in place).

    A mask that allows nothing (a broken coordinator) leaves its row unchanged rather than sampling from
    nothing; the coordinator's matcher then refuses the token and ends the sequence.
    """
    for row, mask in enumerate(masks):
        if mask is None:
            continue
        allowed = allowed_tokens(mask, logits.shape[-1])
        if bool(allowed.any()):
            logits[row].masked_fill_(~allowed, float("-inf"))
    return logits
