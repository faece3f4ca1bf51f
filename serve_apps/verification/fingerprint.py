"""Activation fingerprints: a fixed random projection of a stage's output, small enough to ship.

Every process builds the same projection (fixed seed), so two pipelines that compute the same
activations produce the same fingerprint up to float noise, and a perturbed stage moves it far.
"""

import math
from collections.abc import Sequence

import torch

FINGERPRINT_SEED = 0x5EED


def projection(hidden_size: int, dims: int, seed: int = FINGERPRINT_SEED) -> torch.Tensor:
    """[hidden_size, dims] Gaussian matrix, scaled so a projected unit vector has unit variance."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(hidden_size, dims, generator=generator, dtype=torch.float32) / math.sqrt(hidden_size)


def fingerprint(hidden: torch.Tensor, dims: int) -> tuple[float, ...]:
    """Project every position of `hidden` ([..., H]) onto `dims` fixed directions; flattened."""
    flat = hidden.detach().to(torch.float32).reshape(-1, hidden.shape[-1])
    return tuple(float(x) for x in (flat @ projection(hidden.shape[-1], dims)).flatten())


def distance(a: Sequence[float], b: Sequence[float]) -> float:
    """Largest absolute difference relative to the larger magnitude (inf when the shapes differ)."""
    if len(a) != len(b) or not a:
        return math.inf
    scale = max(1e-6, max(abs(x) for x in a), max(abs(x) for x in b))
    return max(abs(x - y) for x, y in zip(a, b, strict=True)) / scale


def matches(a: Sequence[float], b: Sequence[float], tolerance: float) -> bool:
    return distance(a, b) <= tolerance
