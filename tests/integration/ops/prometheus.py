"""Reading Ray's Prometheus endpoint in tests: scrape, sum samples by name and labels, wait with a deadline."""

import time
import urllib.request
from collections.abc import Callable

import ray
from prometheus_client.parser import text_string_to_metric_families


def metrics_urls() -> list[str]:
    """The metrics endpoint of every alive node of the connected cluster."""
    return [
        f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        for node in ray.nodes()
        if node.get("Alive") and node.get("MetricsExportPort")
    ]


class Scrape:
    """One scrape of every node: samples as (name, labels, value)."""

    def __init__(self, texts: list[str]) -> None:
        self.samples = [
            (sample.name, dict(sample.labels), float(sample.value))
            for text in texts
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        ]

    @classmethod
    def now(cls) -> "Scrape":
        texts = []
        for url in metrics_urls():
            with urllib.request.urlopen(url, timeout=10) as response:
                texts.append(response.read().decode())
        return cls(texts)

    def total(self, name: str, **labels: str) -> float:
        """Sum of the samples named `name` whose labels include `labels` (0 when there are none)."""
        return sum(
            value
            for sample, tags, value in self.samples
            if sample == name and all(tags.get(k) == v for k, v in labels.items())
        )

    def values(self, name: str, **labels: str) -> list[float]:
        return [
            value
            for sample, tags, value in self.samples
            if sample == name and all(tags.get(k) == v for k, v in labels.items())
        ]

    def names(self) -> set[str]:
        return {sample for sample, _, _ in self.samples}


def wait_for(check: Callable[[Scrape], bool], timeout_s: float = 45.0, interval_s: float = 1.0) -> Scrape:
    """Scrape until `check` holds (Ray exports metrics every few seconds); the last scrape either way."""
    deadline = time.monotonic() + timeout_s
    scrape = Scrape.now()
    while not check(scrape) and time.monotonic() < deadline:
        time.sleep(interval_s)
        scrape = Scrape.now()
    return scrape
