"""Scratch space that a crash cannot leak: one directory per live process, swept when its owner dies.

    spool = Spool("/data/spool")      # <root>/<instance>/, locked while this process lives
    path = spool.mkstemp("upload-")   # scratch files and directories go in the instance directory
    spool.sweep()                     # remove what dead processes left (also done by open())
    spool.close()                     # remove this process's directory

Each process holds an exclusive `flock` on `<root>/<instance>.lock` for as long as it lives; the
kernel drops it when the process dies, however it dies (kill -9 included). `sweep()` removes every
instance directory whose lock nobody holds, so several processes may share one root (gateways of a
local cluster, a volume shared by pods) and each start cleans up after the ones that crashed.
Linux/POSIX only (fcntl).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
import time
import uuid

log = logging.getLogger("spool")

LOCK_SUFFIX = ".lock"
LEGACY_AGE = 3600.0


class Spool:
    def __init__(self, root: str, *, name: str = "") -> None:
        self.root = os.path.abspath(root)
        self.instance = f"{name + '-' if name else ''}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.dir = os.path.join(self.root, self.instance)
        self._lock_fd: int | None = None

    @property
    def is_open(self) -> bool:
        return self._lock_fd is not None

    def open(self) -> Spool:
        """Take this process's lock and directory, then sweep what dead processes left."""
        if self._lock_fd is not None:
            return self
        os.makedirs(self.root, exist_ok=True)
        lock_path = self.dir + LOCK_SUFFIX
        while True:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            # A sweeper may have removed the lock file between our open and our flock: then our lock
            # is on an orphaned inode and protects nothing. Check, and take a fresh one if so.
            try:
                same = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self._lock_fd = fd
        os.makedirs(self.dir, exist_ok=True)
        self.sweep()
        return self

    def close(self) -> None:
        """Remove this process's directory and lock (scratch files still open stay readable)."""
        if self._lock_fd is None:
            return
        shutil.rmtree(self.dir, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.dir + LOCK_SUFFIX)
        os.close(self._lock_fd)
        self._lock_fd = None

    def _require_open(self) -> None:
        if self._lock_fd is None:
            self.open()

    def mkstemp(self, prefix: str) -> tuple[int, str]:
        """A new scratch file (fd, path) in this process's directory."""
        self._require_open()
        return tempfile.mkstemp(prefix=prefix, dir=self.dir)

    def mkdtemp(self, prefix: str) -> str:
        """A new scratch directory in this process's directory."""
        self._require_open()
        return tempfile.mkdtemp(prefix=prefix, dir=self.dir)

    def sweep(self) -> int:
        """Remove the directories and locks of processes that are gone. Returns how many."""
        removed = 0
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return 0
        names = {e.name for e in entries}
        instances = {n.removesuffix(LOCK_SUFFIX) for n in names if n.endswith(LOCK_SUFFIX)}
        instances |= {e.name for e in entries if e.is_dir(follow_symlinks=False)}
        for instance in instances:
            if instance == self.instance:
                continue
            if self._remove_if_dead(instance):
                removed += 1
        # Loose files in the root were left by versions that spooled there directly.
        cutoff = time.time() - LEGACY_AGE
        for e in entries:
            if e.is_file(follow_symlinks=False) and not e.name.endswith(LOCK_SUFFIX):
                with contextlib.suppress(FileNotFoundError):
                    if e.stat().st_mtime < cutoff:
                        os.unlink(e.path)
                        removed += 1
        if removed:
            log.info("removed the scratch space of %d stopped processes in %s", removed, self.root)
        return removed

    def _remove_if_dead(self, instance: str) -> bool:
        lock_path = os.path.join(self.root, instance + LOCK_SUFFIX)
        path = os.path.join(self.root, instance)
        try:
            fd = os.open(lock_path, os.O_RDWR)
        except FileNotFoundError:
            fd = None
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False  # its owner is alive
            try:
                shutil.rmtree(path, ignore_errors=True)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(lock_path)
            finally:
                os.close(fd)
            return True
        # A directory without a lock: its owner died before taking one, or after close() began.
        # Owners take the lock before creating the directory, so nobody can be using it.
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            return True
        return False

    def files(self) -> list[str]:
        """Every scratch file under the root (every process's), for tests and diagnostics."""
        out = []
        for d, _, fs in os.walk(self.root):
            out += [os.path.join(d, f) for f in fs if not (d == self.root and f.endswith(LOCK_SUFFIX))]
        return out
