"""The protos pass `buf lint` (STANDARD minus SERVICE_SUFFIX) and their generated stubs carry .pyi files."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ["captioner", "scorer", "style_tagger", "safety", "trainer", "sampler"]


def buf() -> str:
    found = shutil.which("buf") or str(Path(sys.executable).with_name("buf"))
    if not Path(found).exists():
        pytest.fail("buf is not installed (the buf-bin package is in requirements.txt)")
    return found


def test_buf_lint_passes() -> None:
    proc = subprocess.run([buf(), "lint"], cwd=ROOT / "protos", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_buf_lint_catches_a_violation(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "protos", tmp_path / "protos")
    bad = tmp_path / "protos" / "pony" / "v1" / "common.proto"
    bad.write_text(bad.read_text() + "\nenum color { RED = 0; }\n")
    proc = subprocess.run([buf(), "lint"], cwd=tmp_path / "protos", capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "ENUM_PASCAL_CASE" in proc.stdout or "PascalCase" in proc.stdout


@pytest.mark.parametrize("name", ["common", *SERVICES])
def test_every_proto_has_generated_stubs_with_type_stubs(name: str) -> None:
    proto = ROOT / "protos" / "pony" / "v1" / f"{name}.proto"
    assert proto.exists(), f"missing {proto}"
    gen = ROOT / "pony" / "v1"
    assert (gen / f"{name}_pb2.py").exists() and (gen / f"{name}_pb2.pyi").exists()
    assert (gen / f"{name}_pb2_grpc.py").exists()
