"""Every stage transport (direct links, actor calls, a compiled graph) serves the same tokens through 3 stages."""

import asyncio
from pathlib import Path

import pytest

from cluster.config import Settings
from serve_apps.engine.messages import SamplingParams
from serve_apps.protocol import Finished, GenerateRequest, TextDelta
from serve_apps.server.pipeline_server import PipelineServer

PROMPTS = ["The capital of France is", "One two three four", "Hello"]


def generate_all(server: PipelineServer) -> list[str]:
    async def one(i: int, prompt: str) -> str:
        sampling = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        parts = []
        async for event in server.generate(GenerateRequest(f"r{i}", server.plan.name, sampling, prompt=prompt)):
            if isinstance(event, TextDelta):
                parts.append(event.text)
            assert not isinstance(event, Finished) or event.finish_reason == "length"
        return "".join(parts)

    async def run() -> list[str]:
        return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(PROMPTS))))

    return asyncio.run(run())


@pytest.fixture(scope="module")
def outputs(ray_cluster: None, repo_root: Path, model_cache_dir: Path) -> dict[str, list[str]]:
    results = {}
    for transport in ("direct", "actor_calls", "compiled_graph"):
        settings = Settings(
            model={
                "catalogue": repo_root / "configs/models.yaml",
                "served": ["tiny-llama"],
                "cache_dir": model_cache_dir,
            },
            pipeline={"num_stages": 3, "transport": transport, "max_num_seqs": 4},
        )
        server = PipelineServer("tiny-llama", settings)
        try:
            results[transport] = generate_all(server)
            assert server.pool.executor().transport == transport
        finally:
            server.pool.kill()
    return results


@pytest.mark.parametrize("transport", ["actor_calls", "compiled_graph"])
def test_transports_agree(outputs: dict[str, list[str]], transport: str) -> None:
    assert all(outputs["direct"]) and outputs[transport] == outputs["direct"]
