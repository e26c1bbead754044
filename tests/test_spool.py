"""Scratch space that a crash cannot leak (services.shared.spool), with real processes killed -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from services.shared.spool import Spool
from tests.support.procs import ROOT

CHILD = """
import sys, time
from services.shared.spool import Spool
spool = Spool(sys.argv[1], name="child").open()
fd, path = spool.mkstemp("upload-")
import os; os.write(fd, b"x" * 1000); os.close(fd)
open(spool.mkdtemp("job-") + "/pcm", "wb").write(b"y" * 1000)
print(spool.dir, flush=True)
time.sleep(600)
"""


def _child(root: Path) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(root)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def test_a_live_process_keeps_its_spool_and_a_killed_ones_is_removed(tmp_path: Path):
    root = tmp_path / "spool"
    alive, alive_dir = _child(root)
    dead, dead_dir = _child(root)
    try:
        assert os.listdir(alive_dir) and os.listdir(dead_dir)
        mine = Spool(str(root), name="test").open()  # a start sweeps: both owners are alive
        assert os.path.isdir(alive_dir) and os.path.isdir(dead_dir)
        dead.send_signal(signal.SIGKILL)
        dead.wait(10)
        assert mine.sweep() == 1
        assert not os.path.exists(dead_dir) and not os.path.exists(dead_dir + ".lock")
        assert os.path.isdir(alive_dir) and len(mine.files()) == 2  # the live child's two files
        alive.send_signal(signal.SIGKILL)
        alive.wait(10)
        # The next process to start removes what the crashed one left.
        again = Spool(str(root), name="again").open()
        assert again.files() == []
        assert sorted(os.listdir(root)) == sorted([again.instance, again.instance + ".lock",
                                                   mine.instance, mine.instance + ".lock"])  # fmt: skip
        mine.close()
        again.close()
        assert os.listdir(root) == []
    finally:
        for p in (alive, dead):
            if p.poll() is None:
                p.kill()
                p.wait()


def test_old_loose_files_and_lockless_directories_are_removed(tmp_path: Path):
    root = tmp_path / "spool"
    (root / "orphan-dir").mkdir(parents=True)
    (root / "orphan-dir" / "pcm").write_bytes(b"x")
    old = root / "stt-upload-abc"
    old.write_bytes(b"y")
    past = time.time() - 7200
    os.utime(old, (past, past))
    fresh = root / "stt-upload-new"
    fresh.write_bytes(b"z")
    spool = Spool(str(root)).open()
    assert sorted(os.listdir(root)) == sorted([spool.instance, spool.instance + ".lock", fresh.name])
    spool.close()
