"""The Ray Serve request router of the pipeline deployments: prefer replicas whose providers score higher.

Named in the deployment's `request_router_config` (see serve_apps.builder). Each replica's
`record_routing_stats()` reports its pipeline score (serve_apps.routing.stats); Serve's controller polls
it every `request_routing_stats_period_s` and hands it to every router as `RunningReplica.routing_stats`.

With FIFOMixin, as Serve's own routers: the base class alone assigns a choice only to the request it
was made for, and when that request is no longer routable Serve 2.55's routing loop spins without
awaiting (found under the chaos benchmark: the gateway's router thread held the GIL, its replica
queue-length probes timed out, every request hung). A choice still goes first to the request it was made
for while that one waits (`_get_pending_request_matching_metadata`), and only otherwise to the oldest
waiting request: plain FIFO can hand one request the replica ranked for another.
"""

import random
from typing import Any

from ray.serve._private.common import RequestMetadata
from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from serve_apps.routing.ranking import Candidate, ReplicaStats, rank_candidates

DEFAULT_SCORE_TOLERANCE = 0.02


class ReputationRouter(FIFOMixin, RequestRouter):
    """Ranks replicas by their reported pipeline score; power of two choices where scores are missing."""

    _tolerance: float = DEFAULT_SCORE_TOLERANCE
    _rng: random.Random = random.Random()

    def initialize_state(
        self, score_tolerance: float = DEFAULT_SCORE_TOLERANCE, seed: int | None = None, **_: Any
    ) -> None:
        """Called by Serve with `request_router_kwargs`."""
        self._tolerance = float(score_tolerance)
        self._rng = random.Random(seed)

    def _get_pending_request_matching_metadata(
        self, request_metadata: RequestMetadata | None = None
    ) -> PendingRequest | None:
        """The request this choice was made for, while it still waits; else none (FIFOMixin: the oldest)."""
        return self._get_pending_request_matching_internal_request_id(request_metadata)

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        by_id = {replica.replica_id.unique_id: replica for replica in candidate_replicas}
        candidates = [Candidate(i, ReplicaStats.from_dict(replica.routing_stats)) for i, replica in by_id.items()]
        return [[by_id[i] for i in rank] for rank in rank_candidates(candidates, self._tolerance, self._rng)]
