from pathlib import Path

import pytest
from pydantic import ValidationError

from cluster.config import Settings, load_settings
from cluster.deploy import read_serve_config, settings_for
from cluster.models import load_catalogue
from cluster.models.local import catalogue_with_checkpoint


def test_sections_are_strict() -> None:
    with pytest.raises(ValidationError):
        Settings(pipeline={"num_stagez": 2})
    with pytest.raises(ValidationError):
        Settings(pipeline={"num_stages": 0})
    with pytest.raises(ValidationError):
        Settings(pipeline={"stage_resources": {"memory": 1e9}})


def test_environment_overrides_files(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOLANALM_PIPELINE__NUM_STAGES", "3")
    assert load_settings(pipeline={"num_stages": 2, "max_batch_size": 4}).pipeline.num_stages == 3


def test_cache_dir_is_expanded() -> None:
    assert "~" not in str(Settings().model.cache_dir)


def test_serve_config_args_are_settings_sections(repo_root: Path) -> None:
    app = read_serve_config(repo_root / "configs" / "serve.yaml")
    assert app.import_path == "serve_apps.builder:build_app"
    settings = settings_for(app, {"pipeline": {"num_stages": 3, "num_replicas": None}})
    assert settings.pipeline.num_stages == 3 and settings.pipeline.num_replicas == 1


def test_catalogue_entries_and_errors(repo_root: Path) -> None:
    catalogue = load_catalogue(repo_root / "configs" / "models.yaml")
    assert catalogue.default in catalogue.models
    assert catalogue.get("tiny-llama").source.kind == "tiny"
    assert catalogue.get("smollm2-135m-instruct").source.gguf_file().name.endswith(".gguf")
    with pytest.raises(KeyError, match="known"):
        catalogue.get("gpt-9")


def test_checkpoint_dir_becomes_a_catalogue_entry(repo_root: Path, tmp_path: Path) -> None:
    checkpoint = tmp_path / "my-finetune"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text('{"dtype": "bfloat16"}')
    path, name = catalogue_with_checkpoint(repo_root / "configs" / "models.yaml", checkpoint, tmp_path / "state")
    spec = load_catalogue(path).get(name)
    assert name == "my-finetune" and spec.source.kind == "hf_dir" and spec.dtype == "bfloat16"
