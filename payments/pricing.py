"""Pure pricing and split arithmetic (integers only, so every split sums exactly to the cost)."""

from dataclasses import dataclass

from payments.errors import InvalidRequest

BPS = 10_000


@dataclass(frozen=True, slots=True)
class Price:
    """Base units per 1,000 prompt / completion tokens."""

    prompt_per_1k: int
    completion_per_1k: int


def _ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def request_cost(price: Price, prompt_tokens: int, completion_tokens: int) -> int:
    """Cost of a request, rounded up to a whole base unit."""
    if prompt_tokens < 0 or completion_tokens < 0:
        raise InvalidRequest("token counts must be >= 0")
    return _ceil_div(prompt_tokens * price.prompt_per_1k + completion_tokens * price.completion_per_1k, 1000)


def hold_amount(price: Price, prompt_tokens: int, max_tokens: int) -> int:
    """The most a request can cost: its prompt plus max_tokens completion tokens."""
    if max_tokens < 1:
        raise InvalidRequest("max_tokens must be >= 1", code="invalid_max_tokens")
    return request_cost(price, prompt_tokens, max_tokens)


def proportional_split(total: int, weights: list[int]) -> list[int]:
    """Split `total` in proportion to `weights` by largest remainder; the parts sum to `total`."""
    if total < 0 or not weights or any(w < 0 for w in weights) or sum(weights) == 0:
        raise InvalidRequest("a split needs a total >= 0 and positive weights")
    weight_sum = sum(weights)
    parts = [total * w // weight_sum for w in weights]
    remainders = sorted(range(len(weights)), key=lambda i: (-(total * weights[i] % weight_sum), i))
    for i in remainders[: total - sum(parts)]:
        parts[i] += 1
    return parts


@dataclass(frozen=True, slots=True)
class Split:
    """Who gets what of one request's cost."""

    network: int
    proxy: int
    providers: list[int]


def split_cost(cost: int, layers: list[int], network_bps: int, proxy_bps: int, has_proxy: bool) -> Split:
    """Commission first (rounded down), the rest to providers by layers served."""
    network = cost * network_bps // BPS
    proxy = cost * proxy_bps // BPS if has_proxy else 0
    providers = proportional_split(cost - network - proxy, layers)
    return Split(network=network, proxy=proxy, providers=providers)
