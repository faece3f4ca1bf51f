"""Fixtures of the k8s tests: the manifests, the render script and the shared cluster spec."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType
from typing import Any

import pytest
import yaml

from tests.unit.k8s.crd_schema import (
    CHART_VALUES_DIR,
    CRD_DIR,
    CRD_FILES,
    REPO_ROOT,
    SHARED_DIR,
    load_crd,
    load_yaml_documents,
)

K8S_DIR = REPO_ROOT / "k8s"
KUBERAY_MANIFESTS = ("rayservice.yaml", "rayjob-data-parallel.yaml", "rayjob-federated.yaml")
MONITORING_DIR = K8S_DIR / "monitoring"


def _load_render() -> ModuleType:
    spec = importlib.util.spec_from_file_location("k8s_render", K8S_DIR / "render.py")
    if spec is None or spec.loader is None:
        raise ImportError("cannot load k8s/render.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def render() -> ModuleType:
    """k8s/render.py as a module (it is a script, not part of a package)."""
    return _load_render()


@pytest.fixture(scope="session")
def cluster_spec() -> dict[str, Any]:
    return yaml.safe_load((K8S_DIR / "templates" / "raycluster-spec.yaml").read_text())


def manifest(name: str) -> dict[str, Any]:
    """The single document of a generated KubeRay manifest."""
    docs = load_yaml_documents(K8S_DIR / name)
    if len(docs) != 1:
        raise ValueError(f"k8s/{name}: expected one document, found {len(docs)}")
    return docs[0]


@pytest.fixture(scope="session")
def kuberay_reference() -> None:
    """Skip (visibly, under -ra) without ../shared/kuberay; else parse the CRDs once (~0.8 s)."""
    if not (CRD_DIR.is_dir() and CHART_VALUES_DIR.is_dir()):
        pytest.skip(f"KubeRay CRDs/chart values not found at {SHARED_DIR} (set SOLANALM_SHARED_DIR)")
    for kind in CRD_FILES:
        load_crd(kind)
