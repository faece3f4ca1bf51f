"""A provider that perturbs what it serves is caught by verification of served traffic, then evicted.

The cheater runs the project's stage host with its outputs perturbed on every step (it cannot tell an
audited sequence from any other: the draw is the coordinator's secret). The operator audits a fraction of
sequences by re-executing the provider's layers on its own reference weights. The test counts requests
until the first failed audit, and checks the sanctions: reputation down, that request's pay withheld,
and after repeated failures the provider evicted (under the eligibility floor, or drained) and re-planned away.
"""

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.trust.harness import (
    GFLOPS,
    Operator,
    Provider,
    operator_and_providers,
    operator_overrides,
    wait_until,
)

MODEL = "tiny-llama"
FRACTION = 0.25
MAX_REQUESTS = 60  # P(no audit in 60 requests at 1/4) = 0.75**60 ~ 3e-8
MIN_ELIGIBLE = 0.2  # network.reputation.min_eligible (default): under it a provider gets no stages


@pytest.fixture(scope="module")
def cheater(tmp_path_factory: pytest.TempPathFactory, model_cache_dir: Path) -> Iterator[tuple[Operator, Provider]]:
    work = tmp_path_factory.mktemp("verify")
    overrides = operator_overrides(MODEL, model_cache_dir, work, max_stages=2, max_num_seqs=4)
    overrides["SOLANALM_NETWORK__VERIFICATION_FRACTION"] = str(FRACTION)
    spec = {
        "name": "cheater",
        "model": MODEL,
        "cache_dir": model_cache_dir,
        "module": "tests.integration.trust.cheating_provider",
        "extra_args": ["--throughput-gflops", GFLOPS, "--cheat", "perturb"],
    }
    with operator_and_providers(work, overrides, [spec]) as (operator, (provider,)):
        wait_until(lambda: provider.provider_id in _hosts(operator), 600, "a pipeline with the cheater's stage")
        yield operator, provider


def _hosts(operator: Operator) -> list[str]:
    try:
        health = operator.get_detail("/healthz").json()
    except (httpx.HTTPError, ValueError):
        return []
    return [stage["node_id"] for stage in (health.get("pipelines") or [{}])[0].get("stages") or []]


def _record(operator: Operator, provider_id: str) -> dict:
    nodes = operator.get_detail("/v1/network/nodes").json()
    return next(node for node in nodes["data"] if node["node_id"] == provider_id)


def test_a_provider_perturbing_served_traffic_is_caught_withheld_and_evicted(
    cheater: tuple[Operator, Provider],
) -> None:
    operator, provider = cheater
    client = operator.openai(120)
    initial = _record(operator, provider.provider_id)["reputation"]
    settlements: list[str] = []
    for count in range(1, MAX_REQUESTS + 1):
        raw = client.completions.with_raw_response.create(model=MODEL, prompt=f"Count to {count}:", max_tokens=8)
        settlements.append(raw.headers["x-solanalm-settlement-id"])
        time.sleep(0.3)  # audits run off the serving path
        if _record(operator, provider.provider_id)["verifications_failed"] > 0:
            break
    # The last audits may still be running when the loop ends.
    wait_until(lambda: _record(operator, provider.provider_id)["verifications_failed"] > 0, 120, "a failed audit")
    record = _record(operator, provider.provider_id)
    assert record["reputation"] < initial
    assert record["verifications_passed"] == 0

    def first_withheld() -> int | None:
        """1-based index of the first request whose pay to the cheater was withheld (the one caught)."""
        for index, settlement in enumerate(settlements, start=1):
            receipt = operator.get(f"/v1/receipts/{settlement}", headers={"Authorization": "Bearer open"}).json()
            if any(line["role"] == "withheld" and line["wallet"] == provider.wallet for line in receipt["shares"]):
                return index
        return None

    wait_until(lambda: first_withheld() is not None, 60, "the caught request's provider pay withheld")
    print(f"\ncheater caught on request {first_withheld()} (audit fraction {FRACTION})")

    # Repeated failures evict it: under the eligibility floor (reputation halves per failed audit) or drained
    # by the auditor (three failures), whichever comes first; then the controller re-plans without it.
    def evicted() -> bool:
        record = _record(operator, provider.provider_id)
        return bool(record["draining"]) or record["reputation"] < MIN_ELIGIBLE

    for count in range(MAX_REQUESTS * 3):
        if evicted():
            break
        client.completions.create(model=MODEL, prompt=f"Again {count}:", max_tokens=8)
        time.sleep(0.2)
    assert evicted(), _record(operator, provider.provider_id)
    wait_until(lambda: provider.provider_id not in _hosts(operator), 300, "the pipeline re-planned without it")
    reply = client.completions.create(model=MODEL, prompt="After eviction:", max_tokens=4)
    assert reply.choices[0].text is not None
