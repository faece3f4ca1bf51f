"""The whole path over HTTP: openai client → Serve gateway → replica → 3 stage actors in a placement group."""

import concurrent.futures
import json
import os
from pathlib import Path

import httpx
import openai
import pytest
import ray
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cluster.models import load_catalogue, materialize
from tests.integration.operator_views import detail_health
from tests.integration.serve.conftest import STAGES, ServedApp

TINY = "tiny-llama"
SMOL = "smollm2-135m-instruct-fp32"
QUESTION = "What is the capital of France?"


def model_dir(served: ServedApp, name: str) -> Path:
    return materialize(load_catalogue(served.settings.model.catalogue).get(name), served.settings.model.cache_dir)


def reference_completion(path: Path, prompt: str, max_new_tokens: int, chat: bool) -> str:
    tokenizer = AutoTokenizer.from_pretrained(path)
    if chat:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer.encode(text, add_special_tokens=False)
    else:
        ids = tokenizer.encode(prompt)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    out = model.generate(
        torch.tensor([ids]),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    return tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)


def test_models_lists_the_catalogue_entries(served: ServedApp) -> None:
    assert sorted(m.id for m in served.client().models.list().data) == sorted([TINY, SMOL])


def test_smollm2_answers_through_three_stages_exactly_as_unsharded(served: ServedApp) -> None:
    reply = served.client().chat.completions.create(
        model=SMOL, messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=24
    )
    answer = reply.choices[0].message.content
    assert "Paris" in answer
    assert answer == reference_completion(model_dir(served, SMOL), QUESTION, 24, chat=True)
    assert reply.usage.prompt_tokens > 10 and reply.usage.completion_tokens <= 24


def test_tiny_greedy_completion_equals_unsharded_generate(served: ServedApp) -> None:
    prompt = "The quick brown fox"
    reply = served.client().completions.create(model=TINY, prompt=prompt, max_tokens=16, temperature=0)
    assert reply.choices[0].text == reference_completion(model_dir(served, TINY), prompt, 16, chat=False)


def test_streaming_chat_matches_the_non_streamed_answer(served: ServedApp) -> None:
    client = served.client()
    messages = [{"role": "user", "content": "Count to five."}]
    whole = client.chat.completions.create(model=SMOL, messages=messages, temperature=0, max_tokens=20)
    chunks = list(
        client.chat.completions.create(
            model=SMOL,
            messages=messages,
            temperature=0,
            max_tokens=20,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_seeded_sampling_is_reproducible_over_http(served: ServedApp) -> None:
    client = served.client()

    def sample(seed: int) -> str:
        return (
            client.completions.create(
                model=TINY, prompt="Once upon", max_tokens=12, temperature=1.0, top_p=0.95, seed=seed
            )
            .choices[0]
            .text
        )

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_stop_sequence_and_max_tokens(served: ServedApp) -> None:
    client = served.client()
    reply = client.chat.completions.create(
        model=SMOL, messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=24, stop=["Paris"]
    )
    assert "Paris" not in reply.choices[0].message.content and reply.choices[0].finish_reason == "stop"
    short = client.completions.create(
        model=TINY, prompt="a b c", max_tokens=3, temperature=0, extra_body={"ignore_eos": True}
    )
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"


def test_concurrent_requests_all_complete_with_their_own_answers(served: ServedApp) -> None:
    client = served.client()
    prompts = [f"Item {i}:" for i in range(8)]

    def ask(prompt: str) -> str:
        return client.completions.create(model=TINY, prompt=prompt, max_tokens=10, temperature=0).choices[0].text

    alone = [ask(p) for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, prompts))
    assert together == alone


def test_stages_run_in_their_own_processes_and_hold_their_share(served: ServedApp) -> None:
    health = detail_health(served.base_url, served.settings).json()
    pipelines = {p["model"]: p for p in health["pipelines"]}
    assert health["status"] == "ok"
    stages = pipelines[SMOL]["stages"]
    # Equal work: the last stage also runs the lm_head (8 of SmolLM2's layers, for half the tokens: 4), so it
    # gets fewer layers.
    assert [tuple(s["layers"]) for s in stages] == [(0, 11), (11, 23), (23, 30)]
    assert len({s["pid"] for s in stages}) == STAGES
    # SmolLM2: 162.8M parameters, plus a tied lm_head copy on the last stage.
    assert [round(s["param_count"] / 1e6, 1) for s in stages] == [67.3, 42.5, 53.1]


def test_stage_memory_matches_its_weights(served: ServedApp) -> None:
    infos = [
        ray.get(ray.get_actor(name, namespace=namespace).describe.remote(), timeout=60)
        for name, namespace in _stage_actors(SMOL)
    ]
    assert len(infos) == STAGES
    for info in infos:
        assert info.extra["weight_quant"] == "none" and info.extra["low_bit_bytes"] == "0"  # the fp32 entry
        assert 0.6 < info.load_rss_bytes / info.param_bytes < 1.6, info


def test_the_pipeline_keeps_in_flight_as_many_steps_as_its_stages_can_compute_at_once(served: ServedApp) -> None:
    health = detail_health(served.base_url, served.settings).json()
    pipelines = {p["model"]: p for p in health["pipelines"]}
    # Three 1-CPU stages on this one node: as many steps in flight as its cores run stages at once.
    assert pipelines[SMOL]["max_inflight_steps"] == min(STAGES, len(os.sched_getaffinity(0)))


def test_each_replica_reserves_one_bundle_per_stage(served: ServedApp) -> None:
    groups = [
        g
        for g in ray.util.placement_group_table().values()
        if g["state"] == "CREATED" and "pipeline" in (g.get("name") or "")
    ]
    assert len(groups) == 2  # one replica per model
    for group in groups:
        assert list(group["bundles"].values()) == [{"CPU": 1.0}] * STAGES


def _stage_actors(model: str) -> list[tuple[str, str]]:
    found = [
        (a["name"], a["namespace"])
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(f"stage:{model}:")
    ]
    return sorted(found, key=lambda item: int(item[0].split(":")[3]))


def test_bad_requests_get_openai_errors_over_http(served: ServedApp) -> None:
    client = served.client()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model=TINY, prompt="hi", max_tokens=100_000)
    assert too_long.value.code == "context_length_exceeded"
    raw = httpx.post(
        served.base_url + "/chat/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert raw.status_code == 400 and json.loads(raw.text)["error"]["code"] == "invalid_json"


def test_client_disconnect_frees_the_sequence(served: ServedApp) -> None:
    url = served.base_url + "/completions"
    body = {"model": TINY, "prompt": "x", "max_tokens": 400, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", url, json=body, timeout=60) as response:
        lines = response.iter_lines()
        next(lines)
        next(lines)
    for _ in range(50):
        running = {
            p["model"]: p["running"] for p in detail_health(served.base_url, served.settings).json()["pipelines"]
        }
        if running[TINY] == 0:
            break
        import time

        time.sleep(0.2)
    assert running[TINY] == 0


def test_status_command_shows_every_stage(served: ServedApp) -> None:
    from typer.testing import CliRunner

    from cluster.cli import app

    result = CliRunner().invoke(app, ["status", "--address", "auto"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    # Split by work: the lm_head weighs on the last stage (the tiny model's head outweighs all its layers).
    for layers in ("0-11", "11-23", "23-30", "0-3", "3-5", "5-6"):
        assert layers in result.output


def test_every_request_is_metered_with_a_readable_receipt(served: ServedApp) -> None:
    """Open mode (the embedded demo): no charge, but a settlement record per request and its receipt."""
    response = httpx.post(
        served.base_url + "/completions",
        json={"model": TINY, "prompt": "Pay me", "max_tokens": 4, "temperature": 0},
        timeout=60,
    )
    body = response.json()
    settlement_id = response.headers["x-solanalm-settlement-id"]
    assert body["settlement_id"] == settlement_id
    receipt = httpx.get(served.base_url + f"/receipts/{settlement_id}", timeout=30).json()
    assert receipt["request_id"] == body["id"] and receipt["completion_tokens"] == 4
    # No operator wallet is configured: the operator's own stages are the treasury's, recorded as the network's
    # share (a treasury is never paid to itself), with their layers kept.
    assert sum(share["layers_served"] for share in receipt["shares"] if share["role"] in ("provider", "network")) == 6
    with httpx.stream(
        "POST",
        served.base_url + "/completions",
        json={"model": TINY, "prompt": "Stream me", "max_tokens": 3, "temperature": 0, "stream": True},
        timeout=60,
    ) as stream:
        events = [json.loads(line[6:]) for line in stream.iter_lines() if line.startswith("data: {")]
    assert events[-1]["settlement_id"].startswith("set_")
