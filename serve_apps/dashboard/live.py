"""This process's live figures: the metric tap (registered on import, so a gateway replica counts from its
start) and the one sampler every SSE client shares (a tick at most once a second, so rates are differences
over the same interval whatever the number of open dashboards)."""

import asyncio
import logging
import time
from collections import deque
from typing import Any

from serve_apps import metrics
from serve_apps.dashboard.views import (
    HISTORY_POINTS,
    LiveStats,
    PipelineFigures,
    pipeline_figures,
    series_point,
)

logger = logging.getLogger(__name__)
TICK_S = 1.0
DESCRIBE_TIMEOUT_S = 5.0

STATS = LiveStats()
metrics.TAPS.append(STATS.tap)


class LiveFeed:
    """The latest tick: per-model figures, per-pipeline queue and KV slots, and the chart's history."""

    def __init__(self, stats: LiveStats) -> None:
        self.stats = stats
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY_POINTS)
        self.figures: dict[str, dict[str, float | None]] = {}
        self.pipelines: list[PipelineFigures] = []
        self.errors: dict[str, str] = {}
        self._at = 0.0
        self._lock = asyncio.Lock()

    async def tick(self, gateway: Any) -> None:
        """Recompute unless the last tick is younger than TICK_S."""
        async with self._lock:
            if time.monotonic() - self._at < TICK_S * 0.9:
                return
            self._at = time.monotonic()
            self.figures = self.stats.figures()
            for model in gateway.backend.models():
                self.figures.setdefault(model, {})
            self.pipelines, self.errors = await read_pipelines(gateway)
            self.history.append(series_point(time.time(), self.figures))


async def read_pipelines(gateway: Any) -> tuple[list[PipelineFigures], dict[str, str]]:
    """Each served model's replica as describe() answers (the one the handle routes to)."""
    pipelines, errors = [], {}
    for model in gateway.backend.models():
        try:
            info = await asyncio.wait_for(gateway.backend.describe(model), DESCRIBE_TIMEOUT_S)
            pipelines.append(pipeline_figures(info))
        except Exception as exc:  # noqa: BLE001 - shown on the page: a pipeline being replaced answers later
            errors[model] = type(exc).__name__
    return pipelines, errors


FEED = LiveFeed(STATS)


def feed() -> LiveFeed:
    return FEED
