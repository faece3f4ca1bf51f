"""TOPLOC-style activation commitments: a few bytes per token that pin a stage's output activations.

The idea and the encoding are TOPLOC's (Ong et al. 2025, arXiv 2501.16007; PrimeIntellect-ai/toploc):
the largest-magnitude activations are a locality-sensitive hash of the whole activation tensor (a
different model, precision or input moves them), and k (index, bfloat16 value) pairs are stored as the
k coefficients of the polynomial through them modulo the prime 65497, with the index reduced by a
modulus under which the chunk's indices stay distinct: 2 bytes per pair instead of 4+. A checker that
recomputes the activations takes its own top-k indices, evaluates the polynomial there (an index that is
not among the committed ones evaluates to a random-looking value) and compares the values.

Two differences from the `toploc` package:
- top-k per *token* (`topk_per_token` pairs per row, `chunk_tokens` rows per polynomial) instead of
  over a flat chunk: every position is covered, so a stage that is wrong on a few positions only is
  caught where its error is (TOPLOC's flat top-k of residual-stream activations goes to the few
  outlier channels of a few tokens). 4 pairs per token in chunks of 32 tokens: (2 + 2 * 128) / 32
  = 8.06 bytes per token, TOPLOC's own size.
- written in torch (vectorized Newton interpolation, a cached inverse table) rather than using the
  package: its wheels are C++ extensions built against one torch version (`toploc` 0.1.6 does not
  import with torch 2.13: undefined symbol `at::TensorBase::const_data_ptr<float>`), and building it
  from source needs a compiler and torch's headers on every machine that runs the coordinator.

Values are compared in bfloat16 units of least precision (ULP): `|claimed - reference| / ulp(reference)`;
TOPLOC's "mantissa difference" generalised across exponent boundaries (1.99 vs 2.0 is 1-2 ULPs, not an
exponent mismatch). A point whose error is above `Tolerance.mismatch_ulps` counts as a mismatch (TOPLOC's
exponent mismatch: a wrong index or a value off by about its own size).
"""

import struct
from dataclasses import dataclass, field
from functools import lru_cache

import torch

PRIME = 65497  # TOPLOC's modulus: the largest prime below 2^16 - 38, so coefficients fit 2 bytes
MAGIC = b"TL"
VERSION = 1
_HEADER = struct.Struct(">2sBBHII")  # magic, version, k, chunk tokens, hidden size, tokens
MAX_TOPK = 64
MAX_CHUNK_TOKENS = 1024
MAX_TOKENS = 1 << 24
BF16_MANTISSA_BITS = 7


class CommitmentError(ValueError):
    """Commitment bytes that are not a well-formed commitment (truncated, forged lengths, bad values)."""


@dataclass(frozen=True, slots=True)
class Commitment:
    """The committed top-k of `num_tokens` rows of width `hidden_size`: one (modulus, coefficients)
    polynomial per chunk of `chunk_tokens` rows (the last chunk may be shorter)."""

    topk: int
    chunk_tokens: int
    hidden_size: int
    num_tokens: int
    chunks: tuple[tuple[int, tuple[int, ...]], ...]

    def __post_init__(self) -> None:
        _validate_shape(self.topk, self.chunk_tokens, self.hidden_size, self.num_tokens)
        expected = _chunk_sizes(self.num_tokens, self.chunk_tokens)
        if len(self.chunks) != len(expected):
            raise CommitmentError(f"{len(self.chunks)} chunks for {self.num_tokens} tokens")
        for (modulus, coeffs), rows in zip(self.chunks, expected, strict=True):
            if not 1 <= modulus <= PRIME or len(coeffs) != rows * self.topk or any(not 0 <= c < PRIME for c in coeffs):
                raise CommitmentError("a chunk's modulus or coefficients are out of range")

    def to_bytes(self) -> bytes:
        head = _HEADER.pack(MAGIC, VERSION, self.topk, self.chunk_tokens, self.hidden_size, self.num_tokens)
        body = b"".join(struct.pack(f">H{len(c)}H", m, *c) for m, c in self.chunks)
        return head + body

    @staticmethod
    def from_bytes(data: bytes) -> "Commitment":
        """Parse and validate; CommitmentError on anything but the exact encoding of a commitment."""
        if len(data) < _HEADER.size:
            raise CommitmentError("commitment shorter than its header")
        magic, version, topk, chunk_tokens, hidden, tokens = _HEADER.unpack_from(data)
        if magic != MAGIC or version != VERSION:
            raise CommitmentError("not a commitment of this version")
        _validate_shape(topk, chunk_tokens, hidden, tokens)
        sizes = _chunk_sizes(tokens, chunk_tokens)
        if len(data) != _HEADER.size + sum(2 + 2 * rows * topk for rows in sizes):
            raise CommitmentError("commitment length does not match its header")
        chunks, offset = [], _HEADER.size
        for rows in sizes:
            values = struct.unpack_from(f">H{rows * topk}H", data, offset)
            offset += 2 + 2 * rows * topk
            chunks.append((values[0], tuple(values[1:])))
        return Commitment(topk, chunk_tokens, hidden, tokens, tuple(chunks))

    @property
    def nbytes(self) -> int:
        return _HEADER.size + sum(2 + 2 * len(c) for _, c in self.chunks)

    @property
    def bytes_per_token(self) -> float:
        return self.nbytes / max(1, self.num_tokens)


@dataclass(frozen=True, slots=True)
class Tolerance:
    """When a reference recomputation still agrees with a commitment (topk 4, rotated stage deltas as
    `serve_apps.verification.audit` commits them). Calibrated on SmolLM2-135M bfloat16 with int4 decode
    steps, 3 stages, 6 sequences of 52-109 positions served through KV-cached mixed batches against a
    cache-free re-execution: honest stages reach mismatch fraction 0.034, 2 mismatches at one position,
    a position mean of 6.5 ULPs, median 1 and mean 0.87 ULPs; a stage with 5 % weight noise 0.16-0.29,
    median 5-6, mean 6.6-9.1 (10 %: 0.33-0.48, mean 12.6-18.1). float32 stages are exact (0 ULPs)."""

    mismatch_ulps: float = 64.0  # a point this far off (bf16 ULPs, ~50 % of its value) is a mismatch
    max_position_mismatches: int = 3  # of a position's topk points; more (all 4): that position is wrong
    max_position_mean_ulps: float = 24.0  # mean error of a position's other points; more: it is wrong
    max_mismatch_fraction: float = 0.08  # of all points
    max_median_ulps: float = 3.0  # median error of the points that are not mismatches
    max_mean_ulps: float = 3.0


# float32 stages recompute exactly on one machine (SmolLM2 fp32 and the tiny model: 0 ULPs everywhere),
# so their thresholds are tighter, yet with room for another CPU's summation order; 1 % weight noise
# on SmolLM2 fp32 gives mismatch fraction 0.054-0.074 and a mean of 1.8-2.4 ULPs: caught.
FLOAT32_TOLERANCE = Tolerance(
    max_position_mismatches=2,
    max_position_mean_ulps=12.0,
    max_mismatch_fraction=0.03,
    max_median_ulps=1.0,
    max_mean_ulps=1.0,
)


def tolerance_for(dtype: str) -> Tolerance:
    """The calibrated tolerance of a stage computing in `dtype` ("float32", "bfloat16", ...)."""
    return FLOAT32_TOLERANCE if dtype == "float32" else Tolerance()


@dataclass(frozen=True, slots=True)
class CheckResult:
    """Whether the reference agrees; `worst_position` is the position with the most mismatches (then the
    largest mean error), `failed_positions` those over `max_position_mismatches`."""

    passed: bool
    reason: str
    worst_position: int | None
    failed_positions: tuple[int, ...] = ()
    stats: dict[str, float] = field(default_factory=dict)


def token_topk(rows: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the `topk` largest-magnitude columns: (indices [T, k] long, bfloat16 bit patterns [T, k]
    as int64 in [0, 65535]). Ties are broken by torch.topk; values are rounded to bfloat16 first."""
    if rows.dim() != 2 or rows.shape[1] < topk:
        raise ValueError(f"rows must be [T, H] with H >= {topk}, got {tuple(rows.shape)}")
    values = rows.detach().to(torch.bfloat16)
    indices = values.float().abs().topk(topk, dim=1).indices
    return indices, _bits(values.gather(1, indices))


def commit(outputs: torch.Tensor, topk: int = 4, chunk_tokens: int = 32) -> Commitment:
    """The commitment of `outputs` [T, H] (rows in position order)."""
    indices, bits = token_topk(outputs, topk)
    return commit_topk(indices, bits, outputs.shape[1], chunk_tokens)


def commit_topk(indices: torch.Tensor, bits: torch.Tensor, hidden_size: int, chunk_tokens: int = 32) -> Commitment:
    """The commitment of precomputed `token_topk` rows (so a caller can keep 16 bytes per token while a
    chunk fills, then encode it)."""
    tokens, topk = indices.shape
    chunks = []
    for start in range(0, tokens, chunk_tokens):
        x = _flat_points(indices[start : start + chunk_tokens], hidden_size)
        modulus = _injective_modulus(x)
        coeffs = _interpolate(x % modulus, bits[start : start + chunk_tokens].reshape(-1) % PRIME)
        chunks.append((modulus, tuple(int(c) for c in coeffs.tolist())))
    return Commitment(topk, chunk_tokens, hidden_size, tokens, tuple(chunks))


def check(commitment: Commitment, reference_outputs: torch.Tensor, tolerance: Tolerance | None = None) -> CheckResult:
    """Compare `reference_outputs` [T, H] (recomputed from the same inputs) with `commitment`."""
    tol = tolerance or Tolerance()
    shape = (commitment.num_tokens, commitment.hidden_size)
    if tuple(reference_outputs.shape) != shape:
        return CheckResult(False, f"shape {tuple(reference_outputs.shape)} != committed {shape}", None)
    errors = claimed_errors(commitment, reference_outputs)  # [T, k] ULPs
    return judge_errors(errors, tol)


def claimed_errors(commitment: Commitment, reference_outputs: torch.Tensor) -> torch.Tensor:
    """[T, k] error in bf16 ULPs of the committed value at each of the reference's top-k points (inf
    where the committed value is not finite)."""
    indices, bits = token_topk(reference_outputs, commitment.topk)
    reference = _from_bits(bits).float()
    errors = []
    for chunk, (modulus, coeffs) in enumerate(commitment.chunks):
        start = chunk * commitment.chunk_tokens
        x = _flat_points(indices[start : start + commitment.chunk_tokens], commitment.hidden_size)
        claimed_bits = _evaluate(torch.tensor(coeffs, dtype=torch.long), x % modulus)
        claimed = _from_bits(claimed_bits).float()
        ref = reference[start : start + commitment.chunk_tokens].reshape(-1)
        errors.append(ulp_error(claimed, ref).view(-1, commitment.topk))
    return torch.cat(errors)


def ulp_error(claimed: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """|claimed - reference| in bfloat16 ULPs of the reference (inf where claimed is not finite)."""
    _, exponent = torch.frexp(reference)
    ulp = torch.ldexp(torch.ones_like(reference), exponent - 1 - BF16_MANTISSA_BITS)
    ulp = torch.where(reference == 0, torch.finfo(torch.bfloat16).tiny, ulp)
    error = (claimed - reference).abs() / ulp
    return torch.where(torch.isfinite(claimed), error, torch.full_like(error, float("inf")))


def judge_errors(errors: torch.Tensor, tol: Tolerance) -> CheckResult:
    """The verdict over [T, k] point errors (ULPs)."""
    mismatch = errors > tol.mismatch_ulps
    per_position = mismatch.sum(dim=1)
    matched = errors[~mismatch]
    kept = (~mismatch).sum(dim=1).clamp(min=1)
    position_mean = torch.where(mismatch, torch.zeros_like(errors), errors).sum(dim=1) / kept
    stats = {
        "points": float(errors.numel()),
        "mismatch_fraction": float(mismatch.float().mean()) if errors.numel() else 0.0,
        "max_position_mismatches": float(per_position.max()) if errors.numel() else 0.0,
        "max_position_mean_ulps": float(position_mean.max()) if errors.numel() else 0.0,
        "median_ulps": float(matched.median()) if matched.numel() else float("inf"),
        "mean_ulps": float(matched.mean()) if matched.numel() else float("inf"),
    }
    worst = int(torch.argmax(per_position.float() * 1e6 + position_mean)) if errors.numel() else None
    wrong = (per_position > tol.max_position_mismatches) | (position_mean > tol.max_position_mean_ulps)
    failed = tuple(int(i) for i in torch.nonzero(wrong).flatten())
    reasons = []
    if failed:
        reasons.append(
            f"{len(failed)} positions with more than {tol.max_position_mismatches} mismatches or a mean error"
            f" over {tol.max_position_mean_ulps} ULPs (first {failed[0]})"
        )
    if stats["mismatch_fraction"] > tol.max_mismatch_fraction:
        reasons.append(f"mismatch fraction {stats['mismatch_fraction']:.3f} > {tol.max_mismatch_fraction}")
    if stats["median_ulps"] > tol.max_median_ulps:
        reasons.append(f"median error {stats['median_ulps']:.2f} ULPs > {tol.max_median_ulps}")
    if stats["mean_ulps"] > tol.max_mean_ulps:
        reasons.append(f"mean error {stats['mean_ulps']:.2f} ULPs > {tol.max_mean_ulps}")
    return CheckResult(not reasons, "; ".join(reasons) or "agrees", worst, failed, stats)


# -- encoding internals -------------------------------------------------------------------------------
def _validate_shape(topk: int, chunk_tokens: int, hidden: int, tokens: int) -> None:
    if not 1 <= topk <= MAX_TOPK or not 1 <= chunk_tokens <= MAX_CHUNK_TOKENS:
        raise CommitmentError(f"topk {topk} / chunk_tokens {chunk_tokens} out of range")
    if hidden < topk or hidden > 1 << 20 or not 0 <= tokens <= MAX_TOKENS:
        raise CommitmentError(f"hidden size {hidden} / tokens {tokens} out of range")
    if chunk_tokens * topk > PRIME // 2:
        raise CommitmentError("a chunk holds more points than the field can interpolate")


def _chunk_sizes(tokens: int, chunk_tokens: int) -> list[int]:
    return [min(chunk_tokens, tokens - start) for start in range(0, tokens, chunk_tokens)]


def _flat_points(indices: torch.Tensor, hidden_size: int) -> torch.Tensor:
    rows = torch.arange(indices.shape[0], dtype=torch.long).view(-1, 1)
    return (rows * hidden_size + indices).reshape(-1)


def _injective_modulus(x: torch.Tensor) -> int:
    """The largest modulus <= PRIME under which the points stay distinct (TOPLOC's search)."""
    for modulus in range(PRIME, x.numel() - 1, -1):
        if torch.unique(x % modulus).numel() == x.numel():
            return modulus
    raise ValueError("no injective modulus")  # unreachable: x are distinct and modulus >= len(x) exists


@lru_cache(maxsize=1)
def _inverses() -> torch.Tensor:
    """a^-1 mod PRIME for every a (a^(PRIME-2), vectorized square-and-multiply)."""
    base = torch.arange(PRIME, dtype=torch.long)
    result = torch.ones(PRIME, dtype=torch.long)
    exponent = PRIME - 2
    while exponent:
        if exponent & 1:
            result = result * base % PRIME
        base = base * base % PRIME
        exponent >>= 1
    return result


def _interpolate(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Monomial coefficients (low to high) mod PRIME of the polynomial through (x, y), x distinct."""
    inv = _inverses()
    n = x.numel()
    dd = y.to(torch.long) % PRIME
    for k in range(1, n):  # Newton divided differences, vectorized over i
        dd = dd.clone()
        dd[k:] = (dd[k:] - dd[k - 1 : n - 1]) % PRIME * inv[(x[k:] - x[: n - k]) % PRIME] % PRIME
    coeffs = torch.zeros(n, dtype=torch.long)
    coeffs[0] = dd[n - 1]
    for i in range(n - 2, -1, -1):  # Horner expansion of the Newton form: p = p * (z - x_i) + dd_i
        shifted = torch.zeros(n, dtype=torch.long)
        shifted[1:] = coeffs[:-1]
        coeffs = (shifted - x[i] * coeffs) % PRIME
        coeffs[0] = (coeffs[0] + dd[i]) % PRIME
    return coeffs


def _evaluate(coeffs: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The polynomial (monomial coefficients, low to high) at each z, mod PRIME."""
    result = torch.zeros_like(z)
    for c in coeffs.flip(0):
        result = (result * z + c) % PRIME
    return result


def _bits(values: torch.Tensor) -> torch.Tensor:
    return values.contiguous().view(torch.int16).to(torch.long) & 0xFFFF


def _from_bits(bits: torch.Tensor) -> torch.Tensor:
    signed = torch.where(bits >= 1 << 15, bits - (1 << 16), bits)
    return signed.to(torch.int16).view(torch.bfloat16)
