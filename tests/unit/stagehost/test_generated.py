"""The committed stage_pb2*.py(i) are what protoc makes of stage.proto today (regenerate: see __init__.py)."""

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
PACKAGE = Path("serve_apps") / "stagehost"
GENERATED = ("stage_pb2.py", "stage_pb2.pyi", "stage_pb2_grpc.py")


def test_the_generated_modules_match_stage_proto(tmp_path: Path) -> None:
    protoc = pytest.importorskip("grpc_tools.protoc")
    (tmp_path / PACKAGE).mkdir(parents=True)
    shutil.copy(ROOT / PACKAGE / "stage.proto", tmp_path / PACKAGE / "stage.proto")
    out = str(tmp_path)
    args = ["protoc", f"-I{out}", f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}"]
    assert protoc.main([*args, str(tmp_path / PACKAGE / "stage.proto")]) == 0
    for name in GENERATED:
        fresh = (tmp_path / PACKAGE / name).read_text()
        assert fresh == (ROOT / PACKAGE / name).read_text(), f"{name} is stale: regenerate it from stage.proto"


def test_the_grpc_module_imports_its_messages_by_package() -> None:
    text = (ROOT / PACKAGE / "stage_pb2_grpc.py").read_text()
    assert "from serve_apps.stagehost import stage_pb2" in text
