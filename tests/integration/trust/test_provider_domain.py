"""Providers outside the operator's Ray cluster serve SmolLM2's layers beside the operator's own stage.

One operator head with token authentication (`ray start --head` + `solanalm up --address`), two
`solanalm provider serve` processes with their own HOME and no Ray token, reaching the operator only
through the gateway's HTTP API (registration) and their stage hosts (the coordinator dials them). The
controller re-plans when they register; the test then checks the answers, the settlements' payees, what
a provider process can reach, and that killing a provider mid-generation loses no request.
"""

import concurrent.futures
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.integration.trust.harness import (
    GFLOPS,
    Operator,
    Provider,
    operator_and_providers,
    operator_overrides,
    wait_until,
)

MODEL = "smollm2-135m-instruct"
QUESTION = "What is the capital of France?"
REPLAN_TIMEOUT_S = 600.0


@pytest.fixture(scope="module")
def domain(
    tmp_path_factory: pytest.TempPathFactory, model_cache_dir: Path
) -> Iterator[tuple[Operator, list[Provider]]]:
    work = tmp_path_factory.mktemp("trust")
    overrides = operator_overrides(MODEL, model_cache_dir, work, max_stages=3, max_num_seqs=8)
    # Half of the sequences are audited: honest providers (p2 only lies about its work) must pass them.
    overrides["SOLANALM_NETWORK__VERIFICATION_FRACTION"] = "0.5"
    honest = {"name": "p1", "model": MODEL, "cache_dir": model_cache_dir, "extra_args": ["--throughput-gflops", GFLOPS]}
    # p2 serves honestly but reports 1000x the steps and busy seconds it did (test-only entry point).
    inflating = {**honest, "name": "p2", "module": "tests.integration.trust.cheating_provider"}
    providers = [honest, {**inflating, "extra_args": ["--throughput-gflops", GFLOPS, "--cheat", "inflate"]}]
    # The gateway speaks HTTPS (a CA made for the test): providers register over it with --ca-cert.
    with operator_and_providers(work, overrides, providers, https=True) as (operator, started):
        wait_until(lambda: _planned_over(operator, started), REPLAN_TIMEOUT_S, "a pipeline over operator and providers")
        yield operator, started


def _stages(operator: Operator) -> list[dict]:
    try:
        health = operator.get_detail("/healthz").json()
    except (httpx.HTTPError, ValueError):
        return []
    pipelines = health.get("pipelines") or [{}]
    return list(pipelines[0].get("stages") or [])


def _planned_over(operator: Operator, providers: list[Provider]) -> bool:
    hosts = [stage["node_id"] for stage in _stages(operator)]
    ids = {p.provider_id for p in providers}
    return ids <= set(hosts) and any(host not in ids for host in hosts)


def _client(operator: Operator) -> openai.OpenAI:
    return operator.openai()


def test_layers_are_split_over_the_operator_and_both_providers(domain: tuple[Operator, list[Provider]]) -> None:
    operator, providers = domain
    stages = _stages(operator)
    layers = {stage["node_id"]: stage["layers"] for stage in stages}
    assert len(stages) == 3, stages
    assert sum(end - start for start, end in layers.values()) == 30
    assert {p.provider_id for p in providers} <= set(layers)


def test_answers_are_correct_and_each_settlement_pays_the_proven_wallets(
    domain: tuple[Operator, list[Provider]],
) -> None:
    operator, providers = domain
    raw = _client(operator).chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=24
    )
    reply = raw.parse()
    assert "Paris" in (reply.choices[0].message.content or "")
    settlement = raw.headers["x-solanalm-settlement-id"]
    receipt = operator.get(f"/v1/receipts/{settlement}", headers={"Authorization": "Bearer open"}).json()
    shares = {line["wallet"]: line for line in receipt["shares"] if line["role"] == "provider"}
    layers = {stage["node_id"]: stage["layers"][1] - stage["layers"][0] for stage in _stages(operator)}
    for provider in providers:
        assert shares[provider.wallet]["layers_served"] == layers[provider.provider_id]
    # Token counts are the coordinator's (its scheduler), whatever a provider says of its own work.
    assert receipt["completion_tokens"] == reply.usage.completion_tokens  # type: ignore[union-attr]


def test_a_provider_that_reports_inflated_work_is_paid_by_the_coordinators_counts(
    domain: tuple[Operator, list[Provider]],
) -> None:
    operator, providers = domain
    inflating = providers[1]
    reported = {stage["node_id"]: stage for stage in _stages(operator)}[inflating.provider_id]
    assert reported["steps"] >= 1000 and reported["busy_s"] >= 1000  # what it claims, shown to operators only
    client = _client(operator)
    shares_by_request = []
    for question in ("Name a colour.", "Name a fruit."):
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=16
        )
        reply = raw.parse()
        settlement = raw.headers["x-solanalm-settlement-id"]
        receipt = operator.get(f"/v1/receipts/{settlement}", headers={"Authorization": "Bearer open"}).json()
        assert receipt["completion_tokens"] == reply.usage.completion_tokens  # type: ignore[union-attr]
        shares_by_request.append({line["wallet"]: line["layers_served"] for line in receipt["shares"]})
    layers = reported["layers"][1] - reported["layers"][0]
    assert all(shares[inflating.wallet] == layers for shares in shares_by_request)


def test_honest_providers_pass_the_audits_of_their_served_traffic(domain: tuple[Operator, list[Provider]]) -> None:
    operator, providers = domain
    client = _client(operator)
    for i in range(6):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Say {i} twice."}], temperature=0, max_tokens=16
        )
    nodes = {node["node_id"]: node for node in operator.get_detail("/v1/network/nodes").json()["data"]}

    def audited() -> bool:
        nodes.update({n["node_id"]: n for n in operator.get_detail("/v1/network/nodes").json()["data"]})
        return all(nodes[p.provider_id]["verifications_passed"] > 0 for p in providers)

    wait_until(audited, 300, "an audit of each provider's served work")
    for provider in providers:
        assert nodes[provider.provider_id]["verifications_failed"] == 0, nodes[provider.provider_id]


def test_a_provider_process_has_no_ray_token_and_cannot_join_the_cluster(
    domain: tuple[Operator, list[Provider]],
) -> None:
    operator, providers = domain
    provider = providers[1]
    assert provider.process is not None
    environ = Path(f"/proc/{provider.process.pid}/environ").read_bytes().split(b"\0")
    assert not [v for v in environ if v.startswith((b"RAY_AUTH_TOKEN", b"SOLANALM_"))]
    assert not (Path(provider.env()["HOME"]) / ".ray" / "auth_token").exists()
    probe = (
        "import ray, sys\n"
        f"try:\n    ray.init(address='{operator.address}', log_to_driver=False)\n"
        "except Exception as exc:\n    print('refused', type(exc).__name__); sys.exit(3)\n"
        "print('joined'); sys.exit(0)\n"
    )
    env = {**provider.env(), "RAY_AUTH_MODE": "token"}
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 3, result.stdout + result.stderr


def test_killing_a_provider_mid_generation_loses_no_request(domain: tuple[Operator, list[Provider]]) -> None:
    operator, providers = domain
    client = _client(operator)

    def ask(i: int) -> tuple[str | None, int, float]:
        stream = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"Tell me a long story about the number {i}."}],
            temperature=0,
            max_tokens=96,
            stream=True,
            stream_options={"include_usage": True},
        )
        finish, tokens = None, 0
        for chunk in stream:
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return finish, tokens, time.monotonic()

    killed = providers[0]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(ask, i) for i in range(6)]
        time.sleep(3.0)  # the requests are admitted and decoding
        killed.kill()
        killed_at = time.monotonic()
        results = [future.result(timeout=600) for future in futures]
    assert all(finish in ("length", "stop") for finish, _, _ in results), results
    assert all(tokens > 0 for _, tokens, _ in results), results
    assert all(ended > killed_at for _, _, ended in results), "every request was still generating at the kill"
    # The killed provider's layers now run elsewhere: on an operator stage, or re-planned without it.
    assert killed.provider_id not in {stage["node_id"] for stage in _stages(operator)}
    # The pipeline still answers, with the dead provider's layers on an operator stage or re-planned.
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=24
    )
    assert "Paris" in (reply.choices[0].message.content or "")
