"""Every family through a provider's stage host (real gRPC + TLS on 127.0.0.1, no Ray): greedy output of a
chain that mixes in-process StageWorkers and RemoteStages equals transformers' own `generate` token for
token, and one host holding a stage of every family at once answers each coordinator with its own model.

The second is issue 19's "Gemma 2 through a provider's stage host answered other greedy tokens": a host held
one stage, a later Load replaced it, and a steps stream opened after that was computed by the last model
loaded (same hidden size, so every frame passed the limits)."""

import asyncio
from pathlib import Path

import pytest
import torch

from cluster.security.certs import CertKey
from serve_apps.engine.layer_split import StageSpec, split_layers
from serve_apps.engine.messages import SamplingParams, SeqChunk, StepBatch, StepResult
from serve_apps.engine.stage_worker import StageConfig, StageWorker
from serve_apps.stagehost.client import RemoteStage
from serve_apps.stagehost.server import HostLimits, StageHostServer
from serve_apps.stagehost.wire import FrameLimits, weights_digest
from tests.unit.serve.test_families import FAMILIES, LAYERS, PROMPT, reference, save_family

from .conftest import HOST

SLOTS, MAX_LEN = 2, 64
NEW_TOKENS = 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS)


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stagehost-families")
    return {family: save_family(family, root / family) for family in FAMILIES}


@pytest.fixture(scope="module")
def references(family_dirs: dict[str, Path]) -> dict[str, list[int]]:
    return {family: reference(path, PROMPT, NEW_TOKENS) for family, path in family_dirs.items()}


def config(model_dir: Path, spec: StageSpec) -> StageConfig:
    return StageConfig(str(model_dir), spec, "float32", SLOTS, MAX_LEN, 1)


async def remote(host: StageHostServer, cert: CertKey, token: str, model: str, model_dir: Path, spec: StageSpec):  # type: ignore[no-untyped-def]
    limits = FrameLimits.for_model(model_dir, SLOTS, MAX_LEN, max_batch_size=4, prefill_chunk=64)
    stage = RemoteStage(f"{HOST}:{host.port}", cert.cert_pem, token, limits, timeout_s=60)
    await stage.load(model, config(model_dir, spec), weights_digest(model_dir, spec))
    return stage


async def generate(stages: list[StageWorker | RemoteStage]) -> list[int]:
    """Greedy decode of PROMPT through `stages` in order (a hub chain, as the coordinator runs it)."""
    out: list[int] = []
    batch = StepBatch(0, (SeqChunk("s", 0, 0, tuple(PROMPT), GREEDY),))
    while len(out) < NEW_TOKENS:
        hidden: torch.Tensor | StepResult | None = None
        for stage in stages:
            assert not isinstance(hidden, StepResult)
            if isinstance(stage, RemoteStage):
                hidden = await stage.forward(batch, hidden)
            else:
                hidden = stage.forward(batch, hidden)
        assert isinstance(hidden, StepResult)
        out.append(hidden.token_ids[0])
        batch = StepBatch(len(out), (SeqChunk("s", 0, len(PROMPT) + len(out) - 1, (out[-1],), GREEDY),))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_through_a_stage_host_equals_transformers(
    family: str, family_dirs: dict[str, Path], references: dict[str, list[int]], cert: CertKey, token: str
) -> None:
    """3 stages: the host holds the first and the last, an in-process worker the middle."""
    path = family_dirs[family]
    first, middle, last = split_layers(LAYERS, 3)
    host = StageHostServer({family: path}, cert, token, host=HOST, port=0)
    host.start()

    async def main() -> list[int]:
        head = await remote(host, cert, token, family, path, first)
        tail = await remote(host, cert, token, family, path, last)
        try:
            return await generate([head, StageWorker(config(path, middle)), tail])
        finally:
            await head.close()
            await tail.close()

    try:
        assert asyncio.run(main()) == references[family], family
    finally:
        host.stop(0)


def test_one_host_serves_a_stage_of_every_family_at_once(
    family_dirs: dict[str, Path], references: dict[str, list[int]], cert: CertKey, token: str
) -> None:
    """Every family's last stage loaded on one host before any step; then the pipelines run interleaved."""
    host = StageHostServer(family_dirs, cert, token, host=HOST, port=0, limits=HostLimits(max_stages=len(FAMILIES)))
    host.start()
    first, last = split_layers(LAYERS, 2)

    async def main() -> dict[str, list[int]]:
        tails = {f: await remote(host, cert, token, f, path, last) for f, path in family_dirs.items()}
        heads = {f: StageWorker(config(path, first)) for f, path in family_dirs.items()}
        try:
            runs = [generate([heads[f], tails[f]]) for f in family_dirs]
            return dict(zip(family_dirs, await asyncio.gather(*runs), strict=True))
        finally:
            for tail in tails.values():
                await tail.close()

    try:
        assert asyncio.run(main()) == references
        assert len(host.stages) == len(FAMILIES)
    finally:
        host.stop(0)
