import pytest
from hypothesis import given
from hypothesis import strategies as st

from payments.errors import InvalidRequest
from payments.pricing import Price, hold_amount, proportional_split, request_cost, split_cost


def test_cost_rounds_up_to_a_base_unit() -> None:
    price = Price(prompt_per_1k=1_000, completion_per_1k=3)
    assert request_cost(price, 1, 0) == 1
    assert request_cost(price, 0, 1) == 1  # 0.003 units rounds up
    assert request_cost(price, 1000, 1000) == 1003


def test_hold_covers_any_completion_up_to_max_tokens() -> None:
    price = Price(7, 13)
    held = hold_amount(price, 50, 128)
    assert all(request_cost(price, 50, n) <= held for n in range(129))
    with pytest.raises(InvalidRequest):
        hold_amount(price, 10, 0)


@given(st.integers(0, 10**12), st.lists(st.integers(1, 80), min_size=1, max_size=12))
def test_split_sums_exactly_and_follows_weights(total: int, weights: list[int]) -> None:
    parts = proportional_split(total, weights)
    assert sum(parts) == total
    for part, weight in zip(parts, weights, strict=True):
        assert abs(part - total * weight / sum(weights)) < 1


def test_split_cost_takes_commissions_then_pays_layers() -> None:
    split = split_cost(10_000, [20, 10], network_bps=500, proxy_bps=100, has_proxy=True)
    assert (split.network, split.proxy) == (500, 100)
    assert split.providers == [6_267, 3_133]
    assert split_cost(10_000, [1], 500, 100, has_proxy=False).proxy == 0
