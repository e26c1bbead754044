"""Real service processes for system tests: start with port 0, read the bound port, stop cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServiceProcess:
    """`python -m services.<name>` in its own process group, output captured to a log file."""

    def __init__(
        self, name: str, env: dict[str, str] | None = None, port: int = 0, args: list[str] | None = None
    ):
        self.name = name
        self.dir = Path(tempfile.mkdtemp(prefix=f"stt-{name}-"))
        self.port_file = self.dir / "port"
        self.log_path = self.dir / "log"
        full_env = {**os.environ, "STT_HOST": "127.0.0.1", "STT_LOG_LEVEL": "INFO", **(env or {})}
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", f"services.{name}", "--port", str(port), "--port-file", str(self.port_file),
             *(args or [])],
            cwd=ROOT,
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_port(self, timeout: float = 60.0) -> int:
        deadline = time.monotonic() + timeout
        while not self.port_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} did not start:\n{self.log()[-3000:]}")
            await asyncio.sleep(0.05)
        self.port = int(self.port_file.read_text().strip())
        return self.port

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, sig)

    async def wait_exit(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} did not exit")
            await asyncio.sleep(0.05)
        return int(self.proc.returncode)

    async def stop(self, timeout: float = 20.0) -> None:
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                await self.wait_exit(timeout)
            except TimeoutError:
                self.signal(signal.SIGKILL)
                await self.wait_exit(5)
        self._log.close()

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return 0.0
