"""Every third-party package the code imports directly is declared in its distribution's pyproject.toml.

A package that only arrives through another one's dependencies (fastapi through ray[serve], numpy through
torch) disappears the day that other one drops or moves it; pip does not say so, the import fails at run time.
The imports are read with `ast` (lazy imports inside functions included), mapped to distributions with
`importlib.metadata.packages_distributions`, and compared with the declared requirement names.
"""

import ast
import sys
import tomllib
from collections.abc import Iterator
from functools import cache
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
FIRST_PARTY = {"cluster", "serve_apps", "train_jobs", "payments", "tests", "bench", "solanalm_client"}
# Import names of optional backends that are not installed here (CI has neither), as their distributions.
NOT_INSTALLED = {"llama_cpp": "llama-cpp-python"}


def _import_statements(body: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement in `body` and the blocks nested in it (statements only: imports are not
    expressions, and skipping expressions keeps the walk fast)."""
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            nested = getattr(node, field, None)
            if isinstance(nested, list):
                yield from _import_statements(nested)  # type: ignore[arg-type]


def imported_modules(folder: Path) -> dict[str, str]:
    """Top-level third-party modules imported anywhere under `folder` -> one file that imports it."""
    paths = sorted(folder.rglob("*.py"))
    local = {path.stem for path in paths}  # bench/ scripts import their sibling scripts by name
    found: dict[str, str] = {}
    for path in paths:
        for node in _import_statements(ast.parse(path.read_bytes(), str(path)).body):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in FIRST_PARTY and top not in local:
                    found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def declared(pyproject: Path, extras: tuple[str, ...] | None) -> set[str]:
    """Canonical names of the project's requirements, plus those of `extras` (None: every extra)."""
    project = tomllib.loads(pyproject.read_text())["project"]
    requirements = list(project.get("dependencies", []))
    for extra, items in project.get("optional-dependencies", {}).items():
        if extras is None or extra in extras:
            requirements += items
    return {canonicalize_name(Requirement(item).name) for item in requirements}


@cache
def _distributions() -> dict[str, list[str]]:
    return packages_distributions()


def distributions_of(module: str) -> set[str]:
    names = _distributions().get(module) or [NOT_INSTALLED.get(module, module)]
    return {canonicalize_name(name) for name in names}


def undeclared(folders: list[str], pyproject: Path, extras: tuple[str, ...] | None) -> dict[str, str]:
    names = declared(pyproject, extras)
    imports: dict[str, str] = {}
    for folder in folders:
        for module, where in imported_modules(ROOT / folder).items():
            imports.setdefault(module, where)
    # A module shipped by several distributions (google.protobuf beside google.auth) needs one of them.
    return {module: where for module, where in imports.items() if not distributions_of(module) & names}


@pytest.mark.parametrize(
    ("folders", "pyproject", "extras"),
    [
        # The packages themselves: the main dependencies and the optional backends' extras.
        (["cluster", "serve_apps", "train_jobs", "payments"], "pyproject.toml", ("gpu", "cpu")),
        # Tests, benchmarks and notebooks' helpers may use the dev and bench extras as well.
        (["tests", "bench"], "pyproject.toml", None),
        # The SDK is a distribution of its own.
        (["client/solanalm_client"], "client/pyproject.toml", ()),
    ],
)
def test_every_imported_package_is_declared(folders: list[str], pyproject: str, extras: tuple[str, ...] | None) -> None:
    missing = undeclared(folders, ROOT / pyproject, extras)
    assert not missing, f"imported but not declared in {pyproject}: {missing}"
