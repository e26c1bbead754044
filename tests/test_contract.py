"""The public contract: buf lint / buf breaking, documented error reasons, internal contracts kept out
of the SDK, and the dependency arrows (import-linter)."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import stt.v1
from stt.v1 import common_pb2

ROOT = Path(__file__).resolve().parents[1]
BUF = ROOT / ".venv" / "npm" / "node_modules" / ".bin" / "buf"
ERRORS = {
    "InvalidInput",
    "LimitExceeded",
    "QuotaExceeded",
    "NotFound",
    "WrongState",
    "AlreadyExists",
    "Unauthenticated",
    "PermissionDenied",
    "DeadlineExceeded",
    "Unavailable",
    "Aborted",
    "Internal",
}
# Reasons of internal calls (the dispatcher's fenced writes) that never reach a public client.
INTERNAL_ONLY = {"STALE_LEASE", "JOB_CANCELLED", "CHUNKS_MISSING"}


def _buf() -> str:
    found = os.environ.get("BUF") or (str(BUF) if BUF.exists() else shutil.which("buf"))
    if not found:
        pytest.fail("buf is not installed: run `make buf` (make test installs it)")
    return found


def test_buf_lint_and_breaking():
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "buf.sh")],
        env={**os.environ, "BUF": _buf()},
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def _reasons_in_code() -> dict[str, list[str]]:
    """reason="..." of every domain error raised in the services, with where."""
    found: dict[str, list[str]] = {}
    for path in (ROOT / "services").rglob("*.py"):
        if "internal" in path.parts:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
                continue
            if node.func.id not in ERRORS:
                continue
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            reasons = [k.value for k in node.keywords if k.arg == "reason"]
            assert reasons, f"{where}: {node.func.id}(...) without a reason"
            value = reasons[0]
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                found.setdefault(value.value, []).append(where)
    return found


def test_every_error_reason_is_documented_in_the_contract():
    documented = {n.removeprefix("ERROR_REASON_") for n, _ in common_pb2.ErrorReason.items()}
    used = _reasons_in_code()
    undocumented = {r: w for r, w in used.items() if r not in documented and r not in INTERNAL_ONLY}
    assert not undocumented, f"add these to stt.v1.ErrorReason: {undocumented}"
    assert "ERROR" not in used  # no generic reason


def test_internal_contracts_are_not_in_the_sdk():
    sdk = {p.name for p in Path(stt.v1.__file__).parent.glob("*_pb2.py")}
    assert sdk == {"common_pb2.py", "speech_pb2.py", "jobs_pb2.py"}
    from services.shared.internal.v1 import jobstore_pb2, transcriber_pb2

    assert transcriber_pb2.DESCRIPTOR.package == "stt.internal.v1"
    assert jobstore_pb2.DESCRIPTOR.package == "stt.internal.v1"


def test_dependency_arrows_point_one_way():
    exe = Path(sys.executable).with_name("lint-imports")
    out = subprocess.run([str(exe)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "broken" in out.stdout and "0 broken" in out.stdout


def test_the_sdk_imports_without_the_servers(tmp_path: Path):
    """An SDK-only install: `stt` works and `stt up` explains what to install instead of crashing."""
    shadow = tmp_path / "services"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError('the server is not installed')\n")
    code = (
        f"import sys; sys.path.insert(0, {str(tmp_path)!r})\n"
        "import stt, stt.client, stt.cli\n"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'services' and m != 'services']\n"
        "sys.exit(stt.cli.main(['up']))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert "needs the server" in out.stderr and "pip install" in out.stderr
    assert "Traceback" not in out.stderr


def test_every_error_reason_is_in_the_client_docs():
    doc = (ROOT / "docs" / "api.md").read_text()
    missing = [
        n.removeprefix("ERROR_REASON_")
        for n, v in common_pb2.ErrorReason.items()
        if v and f"`{n.removeprefix('ERROR_REASON_')}`" not in doc
    ]
    assert not missing, f"document these reasons in docs/api.md: {missing}"
