"""Every family's tiny local model, served from its directory (`up --model DIR`'s path: cluster.models.local)
through stage actors in the operator's placement groups, answered over the OpenAI API with the family's own
chat template: prompt tokens as that template renders them, greedy output equal to transformers' own model."""

import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
from ray import serve

from cluster.deploy import deploy, read_serve_config, settings_for
from cluster.models.local import LocalModel, catalogue_with_local
from cluster.status import _pipeline_stages, stages_table
from tests.integration.local_models.families import build_family_dir, families, reference_chat

pytestmark = pytest.mark.slow
FAMILIES = list(families())
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
MAX_TOKENS = 8


@dataclass(frozen=True)
class Served:
    base_url: str
    models: dict[str, LocalModel]  # family -> its local model
    app_name: str

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key="test", max_retries=0, timeout=120)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory: pytest.TempPathFactory, model_cache_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {family: build_family_dir(family, root, model_cache_dir) for family in FAMILIES}


@pytest.fixture(scope="module")
def served(
    ray_cluster: None,
    repo_root: Path,
    model_cache_dir: Path,
    family_dirs: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Served]:
    """One application serving every family's directory, 2 stage actors each (as `up --model DIR ...`)."""
    state = tmp_path_factory.mktemp("state")
    catalogue, found = catalogue_with_local(repo_root / "configs" / "models.yaml", list(family_dirs.values()), state)
    app = read_serve_config(repo_root / "configs" / "serve.yaml")
    settings = settings_for(
        app,
        {
            "model": {
                "served": [m.name for m in found],
                "cache_dir": str(model_cache_dir),
                "catalogue": str(catalogue),
            },
            "pipeline": {"num_stages": 2, "max_num_seqs": 4, "max_queue": 16, "stage_resources": {"CPU": 0.25}},
            "http": {"port": _free_port(), "app_name": "solanalm-families"},
            "network": {"placement": {"use_registry": False}},
            "payments": {"state_dir": str(tmp_path_factory.mktemp("payments")), "actor_name": "solanalm-pay-families"},
        },
    )
    deploy(app, settings)
    yield Served(
        f"http://127.0.0.1:{settings.http.port}/v1", dict(zip(family_dirs, found, strict=True)), "solanalm-families"
    )
    serve.shutdown()


def test_the_local_models_are_listed_under_their_directory_names(served: Served) -> None:
    listed = {m.id for m in served.client().models.list().data}
    assert {f"tiny-{family}-local" for family in FAMILIES} <= listed


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_answers_with_its_own_template_as_transformers_does(
    served: Served, family_dirs: dict[str, Path], family: str
) -> None:
    model = served.models[family]
    assert model.has_chat_template and model.architecture == families()[family](vocab_size=64).model_type
    reply = served.client().chat.completions.create(
        model=model.name, messages=MESSAGES, temperature=0, max_tokens=MAX_TOKENS
    )
    prompt_tokens, text = reference_chat(family_dirs[family], MESSAGES, MAX_TOKENS)
    assert reply.usage is not None and reply.usage.prompt_tokens == prompt_tokens
    assert reply.choices[0].message.content == text


def test_status_shows_what_each_stage_of_each_family_holds(served: Served) -> None:
    from rich.console import Console

    pipelines = {model: stages for model, _, stages in _pipeline_stages(served.app_name)}
    for family in FAMILIES:
        stages = pipelines[served.models[family].name]
        assert [(s.layer_start, s.layer_end) for s in stages][0][0] == 0 and stages[-1].layer_end == 4
        assert len(stages) == 2 and stages[0].has_embedding and stages[-1].has_lm_head
    console = Console(width=250, record=True)
    console.print(stages_table(_pipeline_stages(served.app_name)))
    assert console.export_text().count("tiny-") >= 2 * len(FAMILIES)
