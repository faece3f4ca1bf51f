"""Faults mid-generation: killed stage actors are recreated in their bundles and generation continues."""

import concurrent.futures
import threading
import time

import httpx
import ray

from tests.integration.serve.conftest import ServedApp

TINY = "tiny-llama"
PROMPTS = [f"Request number {i} says" for i in range(8)]


def _complete(served: ServedApp, prompt: str) -> str:
    reply = served.client().completions.create(
        model=TINY, prompt=prompt, max_tokens=48, temperature=0, extra_body={"ignore_eos": True}
    )
    assert reply.usage is not None and reply.usage.completion_tokens == 48
    return reply.choices[0].text


def _stage(model: str, index: int):  # type: ignore[no-untyped-def]
    for actor in ray.util.list_named_actors(all_namespaces=True):
        parts = actor["name"].split(":")
        if parts[0] == "stage" and parts[1] == model and parts[3] == str(index):
            return ray.get_actor(actor["name"], namespace=actor["namespace"])
    raise LookupError(f"no stage {index} of {model}")


def _run_with_kills(served: ServedApp, stage_indices: list[int], delay_s: float) -> list[str]:
    done = threading.Event()

    def killer() -> None:
        for index in stage_indices:
            if done.wait(delay_s):
                return
            ray.kill(_stage(TINY, index), no_restart=True)

    thread = threading.Thread(target=killer)
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        futures = [pool.submit(_complete, served, prompt) for prompt in PROMPTS]
        thread.start()
        results = [future.result(timeout=300) for future in futures]
    done.set()
    thread.join()
    return results


def test_killing_a_stage_during_8_generations_loses_nothing(served: ServedApp) -> None:
    baseline = [_complete(served, prompt) for prompt in PROMPTS]
    before = _stage(TINY, 1)
    assert _run_with_kills(served, [1], delay_s=1.0) == baseline
    assert _stage(TINY, 1) != before  # a new actor took the dead one's place (and name)


def test_repeated_stage_kills_keep_outputs_identical(served: ServedApp) -> None:
    baseline = [_complete(served, prompt) for prompt in PROMPTS]
    assert _run_with_kills(served, [0, 2, 1], delay_s=0.8) == baseline
    health = httpx.get(served.base_url.removesuffix("/v1") + "/healthz", timeout=60).json()
    assert health["status"] == "ok"
    time.sleep(0)
