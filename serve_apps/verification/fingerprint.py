"""Comparing activation fingerprints (pure, no torch: the gateway compares, stages compute them in
`serve_apps.verification.trace`)."""

import math
from collections.abc import Sequence


def distance(a: Sequence[float], b: Sequence[float]) -> float:
    """Largest absolute difference relative to the larger magnitude (inf when the shapes differ)."""
    if len(a) != len(b) or not a:
        return math.inf
    scale = max(1e-6, max(abs(x) for x in a), max(abs(x) for x in b))
    return max(abs(x - y) for x, y in zip(a, b, strict=True)) / scale


def matches(a: Sequence[float], b: Sequence[float], tolerance: float) -> bool:
    return distance(a, b) <= tolerance
