"""Re-placement on node loss: watch the registry, re-plan the pipelines a departed node served, redeploy.

`PlacementController.check()` is one round: read the registry's records (which syncs health from Ray's
node table), find planned nodes that are dead or draining, re-plan every model over the nodes still
eligible and hand the new plans to `redeploy` (in production `serve.run` with the new settings: a
rolling update, new replicas start on the new nodes, old ones drain for `graceful_shutdown_timeout_s`).
When no provider is left the plans are empty: the pipelines go back to the unpinned equal split.
The registry reader and the redeploy are injected, so the loop is unit-tested without Ray.
"""

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from cluster.config.network import PlacementSection
from cluster.network.placement import ModelCost, PlacementError, StagePlan
from cluster.network.records import NodeRecord
from cluster.network.serving_plan import affected_models, departed_nodes, placements_args, plan_models

logger = logging.getLogger(__name__)

RecordsSource = Callable[[], list[NodeRecord]]  # every registry record, health synced from Ray
ReplanRequests = Callable[[], list[str]]  # models the operator asked to re-plan since the last round
Redeploy = Callable[[dict[str, StagePlan]], None]


@dataclass(frozen=True, slots=True)
class Replacement:
    """One re-placement: which nodes left, which models moved, their new plans, how long the redeploy took."""

    departed: tuple[str, ...]
    models: tuple[str, ...]
    plans: dict[str, StagePlan]
    redeploy_s: float


class PlacementController:
    """Keeps the deployed plans on live nodes. `check()` is one round; `start()` runs rounds in a thread."""

    def __init__(
        self,
        costs: Mapping[str, ModelCost],
        plans: Mapping[str, StagePlan],
        section: PlacementSection,
        records: RecordsSource,
        redeploy: Redeploy,
        min_reputation: float = 0.0,
        requests: ReplanRequests | None = None,
    ) -> None:
        self.costs = dict(costs)
        self.plans = dict(plans)
        self.section = section
        self.min_reputation = min_reputation  # the registry's eligibility floor (network.reputation.min_eligible)
        self._records = records
        self._redeploy = redeploy
        self._requests = requests
        self.history: list[Replacement] = []
        self._planned_over: frozenset[str] | None = None  # the eligible nodes the current plans were made over
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> Replacement | None:
        """Re-plan and redeploy when a planned node has departed (dead, draining, or fallen under the
        reputation floor: an evicted provider), when the eligible nodes changed since the last plan (a
        provider's stage host registered), or when the operator asked to re-plan a served model (the nodes'
        figures may have changed), and the new plan differs; None when nothing changes."""
        requested = [m for m in (self._requests() if self._requests else []) if m in self.costs]
        records = self._records()
        departed = departed_nodes(self.plans, records, self.min_reputation)
        eligible = [r for r in records if r.node_id not in departed and self._eligible(r)]
        candidates = frozenset(r.node_id for r in eligible)
        if not departed and not requested and candidates == self._planned_over:
            return None
        plans = self._replan(eligible)
        self._planned_over = candidates
        if not departed and placements_args(plans) == placements_args(self.plans):
            if requested:
                logger.info(
                    "re-plan of %s asked: the current plans are still the best over %s", requested, sorted(candidates)
                )
            return None
        models = affected_models(self.plans, departed) if departed else sorted(set(plans) | set(requested))
        logger.warning(
            "nodes %s left, eligible %s, re-plan asked for %s; re-placing %s: %s",
            sorted(departed),
            sorted(candidates),
            requested,
            models,
            plans,
        )
        started = time.perf_counter()
        self._redeploy(plans)
        self.plans = plans
        event = Replacement(tuple(sorted(departed)), tuple(models), plans, time.perf_counter() - started)
        self.history.append(event)
        return event

    def _eligible(self, record: NodeRecord) -> bool:
        return record.verified and record.health == "alive" and record.reputation >= self.min_reputation

    def _replan(self, eligible: list[NodeRecord]) -> dict[str, StagePlan]:
        if not eligible:
            logger.warning("no eligible provider node left: pipelines fall back to the unpinned equal split")
            return {}
        try:
            return plan_models(self.costs, eligible, self.section)
        except PlacementError as exc:
            logger.error("the remaining nodes cannot hold the models (%s): unpinned equal split", exc)
            return {}

    def start(self) -> None:
        """Run `check()` every `watch_interval_s` in a daemon thread until `stop()`."""
        self._thread = threading.Thread(target=self._loop, name="placement-controller", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _loop(self) -> None:
        while not self._stop.wait(self.section.watch_interval_s):
            try:
                self.check()
            except Exception:  # noqa: BLE001 - a failed round (registry restarting, redeploy error) is retried
                logger.exception("placement check failed; retrying in %.1f s", self.section.watch_interval_s)
