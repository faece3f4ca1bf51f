"""A module-like stand-in for `ray.util.metrics` that keeps what was recorded (a seam, not a mock of Ray)."""

from dataclasses import dataclass, field


@dataclass
class Recorded:
    name: str
    kind: str
    tag_keys: tuple[str, ...]
    boundaries: list[float] = field(default_factory=list)
    calls: list[tuple[str, float, dict[str, str]]] = field(default_factory=list)

    def inc(self, value: float, tags: dict[str, str]) -> None:
        self.calls.append(("inc", value, tags))

    def set(self, value: float, tags: dict[str, str]) -> None:
        self.calls.append(("set", value, tags))

    def observe(self, value: float, tags: dict[str, str]) -> None:
        self.calls.append(("observe", value, tags))


class FakeFlavour:
    """Counter/Gauge/Histogram constructors with Ray's signatures; `created[name]` is the metric object."""

    def __init__(self) -> None:
        self.created: dict[str, Recorded] = {}

    def _make(self, kind: str, name: str, tag_keys: tuple[str, ...], boundaries: list[float] | None = None) -> Recorded:
        if name in self.created:
            raise AssertionError(f"{name} created twice")
        self.created[name] = Recorded(name, kind, tuple(tag_keys), list(boundaries or []))
        return self.created[name]

    def Counter(self, name: str, description: str, tag_keys: tuple[str, ...]) -> Recorded:  # noqa: N802
        return self._make("counter", name, tag_keys)

    def Gauge(self, name: str, description: str, tag_keys: tuple[str, ...]) -> Recorded:  # noqa: N802
        return self._make("gauge", name, tag_keys)

    def Histogram(  # noqa: N802
        self, name: str, description: str, boundaries: list[float], tag_keys: tuple[str, ...]
    ) -> Recorded:
        return self._make("histogram", name, tag_keys, boundaries)

    def values(self, name: str, method: str) -> list[float]:
        metric = self.created.get(name)
        return [value for kind, value, _ in (metric.calls if metric else []) if kind == method]

    def tags(self, name: str) -> list[dict[str, str]]:
        metric = self.created.get(name)
        return [tags for _, _, tags in (metric.calls if metric else [])]
