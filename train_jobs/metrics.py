"""Training metrics: federated round duration, rounds, dropped clients and the privacy budget spent (ε).

Recorded by the Flower ServerApp after each aggregated round (in the process that runs the job's
server: the `ray job submit` driver or `solanalm train fl`). Exported by Ray's Prometheus endpoint as
`ray_<name>` while that process lives (cluster/observability/metrics.py).
"""

from cluster.observability.metrics import LATENCY_BUCKETS_S, MetricSet, MetricSpec

ROUND_DURATION = "solanalm_fl_round_duration_seconds"
ROUNDS = "solanalm_fl_rounds"
CLIENTS_DROPPED = "solanalm_fl_clients_dropped"
EPSILON = "solanalm_fl_epsilon"

SPECS: tuple[MetricSpec, ...] = (
    MetricSpec(
        ROUND_DURATION,
        "histogram",
        "Wall time of one federated round (s), from sending the global model to aggregating the updates.",
        ("job",),
        LATENCY_BUCKETS_S,
    ),
    MetricSpec(ROUNDS, "counter", "Federated rounds aggregated.", ("job",)),
    MetricSpec(CLIENTS_DROPPED, "counter", "Selected clients that did not report in a round.", ("job",)),
    MetricSpec(
        EPSILON,
        "gauge",
        "DP-SGD privacy spent: the largest cumulative ε of any client after the latest round (0 without DP).",
        ("job",),
    ),
)

METRICS = MetricSet(SPECS)


def record_round(job: str, duration_s: float, max_epsilon: float, dropped: int = 0) -> None:
    """One aggregated round of `job`."""
    METRICS.observe(ROUND_DURATION, duration_s, job=job)
    METRICS.inc(ROUNDS, 1, job=job)
    METRICS.inc(CLIENTS_DROPPED, dropped, job=job)
    METRICS.set(EPSILON, max_epsilon, job=job)
