"""The converted-weights cache is keyed by the GGUF file (resolved path, size, mtime), not only by the model
name: two GGUFs that carry the same `general.name` never share a converted copy, a file replaced in place is
converted again, and the same file is converted once."""

import importlib
import os
from pathlib import Path

import pytest

from cluster.models.catalogue import ModelSource, ModelSpec

mat = importlib.import_module("cluster.models.materialize")  # (the package exports the function by that name)


@pytest.fixture
def builds(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Record each conversion instead of running it (it writes the GGUF's bytes as its 'weights')."""
    done: list[Path] = []

    def fake_build(spec: ModelSpec, dtype: str, cache_dir: Path, out: Path) -> None:
        done.append(spec.source.gguf_file())
        (out / "weights").write_bytes(spec.source.gguf_file().read_bytes())

    monkeypatch.setattr(mat, "_build", fake_build)
    return done


def gguf_spec(path: Path) -> ModelSpec:
    return ModelSpec(name="same-general-name", source=ModelSource(kind="gguf", path=path))


def test_two_ggufs_with_one_name_get_their_own_converted_copies(tmp_path: Path, builds: list[Path]) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = tmp_path / "a" / "m.gguf", tmp_path / "b" / "m.gguf"
    first.write_bytes(b"GGUF first")
    second.write_bytes(b"GGUF second")
    cache = tmp_path / "cache"
    one, two = mat.materialize(gguf_spec(first), cache), mat.materialize(gguf_spec(second), cache)
    assert one != two and one.parent == two.parent == cache / "models" / "same-general-name"
    assert (one / "weights").read_bytes() == b"GGUF first" and (two / "weights").read_bytes() == b"GGUF second"
    assert mat.materialize(gguf_spec(first), cache) == one and builds == [first, second]  # cached


def test_a_gguf_replaced_in_place_is_converted_again(tmp_path: Path, builds: list[Path]) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF old")
    cache = tmp_path / "cache"
    old = mat.materialize(gguf_spec(path), cache)
    path.write_bytes(b"GGUF new, longer")
    os.utime(path, ns=(1, 1))
    new = mat.materialize(gguf_spec(path), cache)
    assert new != old and (new / "weights").read_bytes() == b"GGUF new, longer" and len(builds) == 2


def test_the_key_follows_links_to_the_same_file(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF")
    (tmp_path / "link.gguf").symlink_to(path)
    assert mat.source_key(tmp_path / "link.gguf") == mat.source_key(path)
    with pytest.raises(FileNotFoundError):
        mat.source_key(tmp_path / "missing.gguf")
