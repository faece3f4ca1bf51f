"""Writes the Grafana dashboards (k8s/grafana/dashboards/*.json) from the panel lists below.

    python k8s/grafana/build_dashboards.py      # after changing a panel; tests fail while the JSON is stale

Every query reads Ray's Prometheus export of SolanaLM's metrics (`ray_solanalm_*`, see
docs/operations.md); the tests check each metric name against the code's metric definitions.
"""

import json
import sys
from pathlib import Path
from typing import Any

OUT_DIR = Path(__file__).resolve().parent / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
M = '{model=~"$model"}'  # the model template variable


def q(pct: str, name: str, by: str = "le", selector: str = M) -> str:
    """histogram_quantile over 5-minute rates."""
    return f"histogram_quantile({pct}, sum by ({by}) (rate({name}_bucket{selector}[5m])))"


# (title, unit, [(expr, legend)]) per panel; two panels per row.
SERVING = [
    (
        "Requests/s by outcome",
        "reqps",
        [("sum by (model, status) (rate(ray_solanalm_requests_total" + M + "[1m]))", "{{model}} {{status}}")],
    ),
    (
        "Tokens/s",
        "short",
        [
            ("sum by (model) (rate(ray_solanalm_prompt_tokens_total" + M + "[1m]))", "prompt {{model}}"),
            ("sum by (model) (rate(ray_solanalm_completion_tokens_total" + M + "[1m]))", "completion {{model}}"),
        ],
    ),
    (
        "Time to first token",
        "s",
        [
            (q("0.5", "ray_solanalm_ttft_seconds", "le, model"), "p50 {{model}}"),
            (q("0.95", "ray_solanalm_ttft_seconds", "le, model"), "p95 {{model}}"),
            (q("0.99", "ray_solanalm_ttft_seconds", "le, model"), "p99 {{model}}"),
        ],
    ),
    (
        "Time per output token",
        "s",
        [
            (q("0.5", "ray_solanalm_time_per_output_token_seconds", "le, model"), "p50 {{model}}"),
            (q("0.95", "ray_solanalm_time_per_output_token_seconds", "le, model"), "p95 {{model}}"),
        ],
    ),
    (
        "Stage forward latency p95",
        "s",
        [
            (q("0.95", "ray_solanalm_stage_forward_seconds", "le, model, stage"), "{{model}} stage {{stage}}"),
        ],
    ),
    ("Engine steps/s", "short", [("sum by (model) (rate(ray_solanalm_engine_steps_total" + M + "[1m]))", "{{model}}")]),
    (
        "Queue depth and running sequences",
        "short",
        [
            ("sum by (model) (ray_solanalm_queue_depth" + M + ")", "waiting {{model}}"),
            ("sum by (model) (ray_solanalm_running_sequences" + M + ")", "running {{model}}"),
        ],
    ),
    (
        "KV-cache slots",
        "short",
        [
            ("sum by (model) (ray_solanalm_kv_slots_used" + M + ")", "used {{model}}"),
            ("sum by (model) (ray_solanalm_kv_slots_total" + M + ")", "total {{model}}"),
        ],
    ),
]

PAYMENTS = [
    ("Paid to providers (base units/min)", "short", [("sum(increase(ray_solanalm_lamports_paid_total[1m]))", "paid")]),
    ("Owed, not yet paid (base units)", "short", [("max(ray_solanalm_unpaid_lamports)", "unpaid")]),
    (
        "Payout batches",
        "short",
        [
            ("max(ray_solanalm_settlement_batches_pending)", "pending"),
            ("sum(increase(ray_solanalm_settlement_batches_confirmed_total[5m]))", "confirmed / 5m"),
        ],
    ),
    ("Payouts confirmed / 5m", "short", [("sum(increase(ray_solanalm_payouts_confirmed_total[5m]))", "payouts")]),
    (
        "Verification failures by provider",
        "short",
        [
            (
                "sum by (provider_wallet) (increase(ray_solanalm_verification_failures_total[15m]))",
                "{{provider_wallet}}",
            ),
        ],
    ),
    ("Completion tokens billed/s", "short", [("sum(rate(ray_solanalm_completion_tokens_total[1m]))", "tokens/s")]),
]

TRAINING = [
    (
        "Federated round duration",
        "s",
        [
            (q("0.5", "ray_solanalm_fl_round_duration_seconds", "le, job", ""), "p50 {{job}}"),
            (
                "sum by (job) (rate(ray_solanalm_fl_round_duration_seconds_sum[15m]))"
                " / sum by (job) (rate(ray_solanalm_fl_round_duration_seconds_count[15m]))",
                "mean {{job}}",
            ),
        ],
    ),
    ("Privacy spent (max cumulative ε)", "none", [("max by (job) (ray_solanalm_fl_epsilon)", "{{job}}")]),
    ("Rounds aggregated", "short", [("sum by (job) (ray_solanalm_fl_rounds_total)", "{{job}}")]),
    ("Clients dropped", "short", [("sum by (job) (increase(ray_solanalm_fl_clients_dropped_total[15m]))", "{{job}}")]),
]

OVERVIEW = [
    ("Requests/s", "reqps", [("sum by (status) (rate(ray_solanalm_requests_total[1m]))", "{{status}}")]),
    ("Completion tokens/s", "short", [("sum(rate(ray_solanalm_completion_tokens_total[1m]))", "tokens/s")]),
    ("Time to first token p95", "s", [(q("0.95", "ray_solanalm_ttft_seconds", "le", ""), "p95")]),
    ("Waiting requests", "short", [("sum(ray_solanalm_queue_depth)", "waiting")]),
    ("Paid to providers (base units/min)", "short", [("sum(increase(ray_solanalm_lamports_paid_total[1m]))", "paid")]),
    (
        "Verification failures / 15m",
        "short",
        [("sum(increase(ray_solanalm_verification_failures_total[15m]))", "failures")],
    ),
    ("Privacy spent (max ε)", "none", [("max(ray_solanalm_fl_epsilon)", "ε")]),
    ("Pending payout batches", "short", [("max(ray_solanalm_settlement_batches_pending)", "pending")]),
]

DASHBOARDS = {
    "solanalm-overview": ("SolanaLM / Network overview", OVERVIEW, False),
    "solanalm-serving": ("SolanaLM / Serving", SERVING, True),
    "solanalm-payments": ("SolanaLM / Payments", PAYMENTS, False),
    "solanalm-training": ("SolanaLM / Training", TRAINING, False),
}


def _variables(with_model: bool) -> list[dict[str, Any]]:
    variables: list[dict[str, Any]] = [
        {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus", "current": {}}
    ]
    if with_model:
        variables.append(
            {
                "name": "model",
                "label": "Model",
                "type": "query",
                "datasource": DATASOURCE,
                "query": {"query": "label_values(ray_solanalm_requests_total, model)", "refId": "models"},
                "definition": "label_values(ray_solanalm_requests_total, model)",
                "includeAll": True,
                "multi": True,
                "allValue": ".*",
                "refresh": 2,
                "current": {"text": "All", "value": "$__all"},
            }
        )
    return variables


def _panel(index: int, title: str, unit: str, targets: list[tuple[str, str]]) -> dict[str, Any]:
    return {
        "id": index + 1,
        "type": "timeseries",
        "title": title,
        "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": 12, "x": 12 * (index % 2), "y": 8 * (index // 2)},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend}
            for i, (expr, legend) in enumerate(targets)
        ],
    }


def dashboard(uid: str) -> dict[str, Any]:
    title, panels, with_model = DASHBOARDS[uid]
    return {
        "uid": uid,
        "title": title,
        "tags": ["solanalm"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": _variables(with_model)},
        "panels": [_panel(i, *panel) for i, panel in enumerate(panels)],
    }


def render() -> dict[Path, str]:
    return {
        OUT_DIR / f"{uid}.json": json.dumps(dashboard(uid), indent=2, ensure_ascii=False) + "\n" for uid in DASHBOARDS
    }


if __name__ == "__main__":
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for path, text in render().items():
        path.write_text(text)
        print(path, file=sys.stderr)
