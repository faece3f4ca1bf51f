"""A local .gguf file or HF directory becomes a catalogue entry with the name, context and template it carries."""

import json
import logging
from pathlib import Path

import pytest
import yaml
from gguf import GGUFWriter

from cluster.config import Settings
from cluster.models import load_catalogue
from cluster.models.local import catalogue_with_local, model_id, read_local_model

TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}<|assistant|>"


def write_gguf(path: Path, name: str | None, arch: str = "qwen2", context: int = 32768, template: bool = True) -> Path:
    """A metadata-only GGUF (no tensors): what `read_local_model` reads."""
    writer = GGUFWriter(str(path), arch)
    if name is not None:
        writer.add_name(name)
    writer.add_context_length(context)
    if template:
        writer.add_chat_template(TEMPLATE)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Qwen2.5 0.5B Instruct", "qwen2.5-0.5b-instruct"),
        ("Smollm2 135M 8k Lc100K Mix1 Ep2", "smollm2-135m-8k-lc100k-mix1-ep2"),
        ("org/model:v1", "org-model-v1"),
        ("  --Weird__Name!!  ", "weird__name"),
        ("x" * 100, "x" * 64),
    ],
)
def test_model_id_is_lowercase_and_safe(raw: str, expected: str) -> None:
    assert model_id(raw) == expected


def test_model_id_refuses_nothing_left() -> None:
    with pytest.raises(ValueError, match="model id"):
        model_id("::/")


def test_gguf_name_context_and_template_come_from_the_file(tmp_path: Path) -> None:
    model = read_local_model(write_gguf(tmp_path / "whatever.gguf", "Qwen2.5 0.5B Instruct"))
    assert (model.name, model.kind, model.architecture) == ("qwen2.5-0.5b-instruct", "gguf", "qwen2")
    assert model.context_length == 32768 and model.has_chat_template


def test_gguf_without_name_uses_the_file_name(tmp_path: Path) -> None:
    model = read_local_model(write_gguf(tmp_path / "My Model.Q4_K_M.gguf", None, arch="llama", template=False))
    assert model.name == "my-model.q4_k_m" and not model.has_chat_template


def test_hf_dir_reads_config_and_template(tmp_path: Path) -> None:
    checkpoint = tmp_path / "My-Finetune"
    checkpoint.mkdir()
    config = {"model_type": "llama", "max_position_embeddings": 4096, "dtype": "bfloat16"}
    (checkpoint / "config.json").write_text(json.dumps(config))
    (checkpoint / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    model = read_local_model(checkpoint)
    assert (model.name, model.context_length, model.dtype, model.has_chat_template) == (
        "my-finetune",
        4096,
        "bfloat16",
        True,
    )


def test_neither_gguf_nor_checkpoint_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(FileNotFoundError, match="neither"):
        read_local_model(tmp_path / "notes.txt")
    (tmp_path / "broken.gguf").write_bytes(b"not a gguf")
    with pytest.raises(ValueError, match="not a readable GGUF"):
        read_local_model(tmp_path / "broken.gguf")


def test_local_gguf_gets_default_price_and_options_and_says_so(
    repo_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gguf = write_gguf(tmp_path / "q.gguf", "Qwen2.5 0.5B Instruct")
    with caplog.at_level(logging.INFO, logger="cluster.models.local"):
        path, [model] = catalogue_with_local(repo_root / "configs" / "models.yaml", [gguf], tmp_path / "state")
    spec = load_catalogue(path).get(model.name)
    assert spec.source.kind == "gguf" and spec.source.path == gguf.resolve()
    assert spec.max_model_len == 32768 and spec.price is None and spec.backend == "transformers"
    assert spec.dtype == "float32" and spec.weight_quant == "none" and not model.options_from_catalogue
    assert "default price and options" in caplog.text
    assert load_catalogue(path).get("smollm2-135m-instruct").source.kind == "gguf_package"  # base kept


def test_a_catalogue_entry_of_that_name_lends_price_and_options(tmp_path: Path) -> None:
    base = tmp_path / "models.yaml"
    entry = {"source": {"kind": "tiny"}, "dtype": "bfloat16", "weight_quant": "int4", "max_model_len": 2048}
    entry["price"] = {"prompt_per_1k": 5, "completion_per_1k": 7}
    base.write_text(yaml.safe_dump({"default": "qwen2.5-0.5b-instruct", "models": {"qwen2.5-0.5b-instruct": entry}}))
    gguf = write_gguf(tmp_path / "q.gguf", "Qwen2.5 0.5B Instruct", context=32768)
    path, [model] = catalogue_with_local(base, [gguf], tmp_path / "state")
    spec = load_catalogue(path).get(model.name)
    assert spec.source.kind == "gguf" and spec.dtype == "bfloat16" and spec.weight_quant == "int4"
    assert spec.max_model_len == 2048 and spec.price is not None and model.options_from_catalogue


def test_up_selects_a_gguf_by_path(repo_root: Path, tmp_path: Path) -> None:
    from cluster.cli import _select_models

    gguf = write_gguf(tmp_path / "q.gguf", "Tiny Qwen")
    settings = Settings(model={"catalogue": repo_root / "configs" / "models.yaml", "cache_dir": tmp_path / "cache"})
    _select_models(settings, [str(gguf), "tiny-llama"])
    assert settings.model.served == ["tiny-qwen", "tiny-llama"]
    assert load_catalogue(settings.model.catalogue).get("tiny-qwen").source.path == gguf.resolve()
