"""serving_bench --gguf: another GGUF is served as `up --model FILE` serves it (its own name, the file)."""

from pathlib import Path

import pytest

from cluster.models import load_catalogue
from tests.unit.bench.bench_loader import load_bench
from tests.unit.cluster.test_local_model import write_gguf


def test_default_run_is_the_catalogues_smollm2() -> None:
    sb = load_bench("serving_bench")
    model, catalogue, gguf = sb.local_or_default(None)
    assert model == sb.MODEL and gguf is None and catalogue.name == "models.yaml"


def test_a_gguf_run_serves_the_file_under_its_own_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sb = load_bench("serving_bench")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(sb.Path, "home", classmethod(lambda cls: tmp_path))
    gguf = write_gguf(tmp_path / "big.gguf", "Big Model 1B")
    model, catalogue, found = sb.local_or_default(gguf)
    assert model == "big-model-1b" and found == gguf.resolve() and sb.gguf_path(found) == gguf.resolve()
    assert load_catalogue(catalogue).get(model).source.path == gguf.resolve()
