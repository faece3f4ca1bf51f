"""TOPLOC-style commitments: size, the polynomial encoding, what passes and what fails, and that forged or
malformed bytes are rejected before anything is allocated from them."""

import struct

import pytest
import torch

from serve_apps.verification.commitments import (
    PRIME,
    Commitment,
    CommitmentError,
    Tolerance,
    _evaluate,
    _flat_points,
    _interpolate,
    check,
    commit,
    token_topk,
    ulp_error,
)


def rows(tokens: int = 100, hidden: int = 576, seed: int = 0) -> torch.Tensor:
    return torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("topk", "limit"), [(4, 8.5), (8, 16.5)])
def test_a_commitment_costs_about_two_bytes_per_committed_value(topk: int, limit: float) -> None:
    commitment = commit(rows(320), topk=topk)
    assert len(commitment.to_bytes()) == commitment.nbytes
    assert commitment.bytes_per_token <= limit  # 4 per token in chunks of 32: (2 + 256) / 32 + header


def test_bytes_round_trip() -> None:
    commitment = commit(rows(77), topk=4, chunk_tokens=16)  # a short last chunk
    assert Commitment.from_bytes(commitment.to_bytes()) == commitment


def test_the_polynomial_goes_through_every_committed_point() -> None:
    indices, bits = token_topk(rows(32), 4)
    x = _flat_points(indices, 576)
    coeffs = _interpolate(x, bits.reshape(-1) % PRIME)
    assert torch.equal(_evaluate(coeffs, x), bits.reshape(-1) % PRIME)


def test_the_same_activations_pass_with_no_error() -> None:
    data = rows()
    result = check(commit(data), data)
    assert result.passed and result.stats["mismatch_fraction"] == 0.0 and result.stats["mean_ulps"] == 0.0


def test_bfloat16_noise_passes_and_a_wrong_model_fails() -> None:
    data = rows()
    assert check(commit(data), data.to(torch.bfloat16).float() * 1.004).passed  # ~1 ULP
    other = rows(seed=1)
    result = check(commit(data), other)
    assert not result.passed and result.stats["mismatch_fraction"] > 0.9


def test_one_wrong_position_is_caught_and_pinned() -> None:
    data = rows()
    served = data.clone()
    served[63] = rows(1, seed=5)[0]
    result = check(commit(served), data)
    assert not result.passed
    assert result.worst_position == 63 and result.failed_positions == (63,)


def test_a_small_error_on_one_position_is_caught_by_its_mean_error() -> None:
    data = rows()
    served = data.clone()
    served[10] *= 1.25  # every top value 25 % off: ~30 ULPs
    result = check(commit(served), data)
    assert not result.passed and result.failed_positions == (10,)


def test_a_shape_mismatch_fails() -> None:
    result = check(commit(rows(50)), rows(49))
    assert not result.passed and "shape" in result.reason


def test_ulp_error_counts_bfloat16_steps_across_an_exponent_boundary() -> None:
    reference = torch.tensor([1.0, 2.0, 2.0])
    claimed = torch.tensor([1.0 + 2**-7, 2.0 - 2**-7, float("nan")])
    assert ulp_error(claimed, reference).tolist() == [1.0, 0.5, float("inf")]


def good_bytes() -> bytes:
    return commit(rows(40, 64), topk=4, chunk_tokens=32).to_bytes()


@pytest.mark.parametrize(
    "mutate",
    [
        lambda b: b[:5],  # shorter than the header
        lambda b: b[:-1],  # truncated body
        lambda b: b + b"\x00\x00",  # trailing bytes
        lambda b: b"XX" + b[2:],  # not a commitment
        lambda b: b[:2] + b"\x09" + b[3:],  # unknown version
        lambda b: b[:3] + b"\x00" + b[4:],  # topk 0
        lambda b: b[:3] + b"\xff" + b[4:],  # topk too large
        lambda b: b[:10] + struct.pack(">I", 1 << 23) + b[14:],  # forged token count: no huge allocation
        lambda b: b[:4] + struct.pack(">H", 0) + b[6:],  # chunk of 0 tokens
        lambda b: b[:6] + struct.pack(">I", 2) + b[10:],  # hidden size below topk
        lambda b: b[:14] + struct.pack(">H", 0) + b[16:],  # modulus 0
        lambda b: b[:16] + struct.pack(">H", 65535) + b[18:],  # coefficient outside the field
    ],
)
def test_malformed_bytes_are_rejected(mutate) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(CommitmentError):
        Commitment.from_bytes(mutate(good_bytes()))


def test_tolerance_thresholds_are_what_the_checks_use() -> None:
    data = rows()
    served = data.clone()
    served[10] *= 1.25
    lenient = Tolerance(max_position_mean_ulps=1000.0, max_position_mismatches=4)
    assert check(commit(served), data, lenient).passed
