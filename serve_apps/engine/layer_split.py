"""Split a model's decoder layers into contiguous stage ranges (pure functions, no weights)."""

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StageSpec:
    """Stage `index` holds decoder layers [start, end); the first also the embedding, the last norm + lm_head."""

    index: int
    start: int
    end: int
    first: bool
    last: bool

    @property
    def num_layers(self) -> int:
        return self.end - self.start


def split_layers(num_layers: int, num_stages: int, weights: list[float] | None = None) -> list[StageSpec]:
    """Contiguous ranges covering every layer once; sizes proportional to `weights` (equal by default).

    Every stage gets at least one layer, so num_stages may not exceed num_layers.
    """
    if num_layers < 1:
        raise ValueError("num_layers must be >= 1")
    if not 1 <= num_stages <= num_layers:
        raise ValueError(f"num_stages must be in [1, {num_layers}], got {num_stages}")
    weights = weights or [1.0] * num_stages
    if len(weights) != num_stages or any(w <= 0 for w in weights):
        raise ValueError("weights must be positive, one per stage")
    bounds = _bounds(num_layers, weights)
    return [
        StageSpec(index=i, start=bounds[i], end=bounds[i + 1], first=i == 0, last=i == num_stages - 1)
        for i in range(num_stages)
    ]


def _bounds(num_layers: int, weights: list[float]) -> list[int]:
    total = sum(weights)
    bounds, acc = [0], 0.0
    for i, weight in enumerate(weights[:-1]):
        acc += weight
        remaining_stages = len(weights) - i - 1
        ideal = round(num_layers * acc / total)
        low, high = bounds[-1] + 1, num_layers - remaining_stages
        bounds.append(min(max(ideal, low), high))
    bounds.append(num_layers)
    return bounds


def head_balanced_weights(num_layers: int, num_stages: int, head_layers: float) -> list[float]:
    """Weights for `split_layers` that even out the stages' work when the last stage also runs the lm_head,
    which costs `head_layers` decoder layers (SmolLM2: its 49152 x 576 head is about 8 of its 30 layers)."""
    if num_stages == 1:
        return [1.0]
    share = (num_layers + head_layers) / num_stages
    return [share] * (num_stages - 1) + [max(share - head_layers, 1.0)]
