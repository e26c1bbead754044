"""Real multi-process deployments on loopback for system tests (PostgreSQL, Redis, services)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from tests.support.procs import ServiceProcess, free_port


@dataclass
class Cluster:
    """Start transcribers, a jobstore and gateways as separate processes; stop them all."""

    database_url: str
    redis_url: str | None = None
    redis_prefix: str = "stt"
    data_dir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="stt-cluster-"))
    procs: list[ServiceProcess] = field(default_factory=list)
    jobstore_proc: ServiceProcess | None = None

    async def transcriber(self, **env: str) -> ServiceProcess:
        p = ServiceProcess("transcriber", env={"STT_CPU_THREADS": "1", **env})
        self.procs.append(p)
        return await p.start()

    async def jobstore(self, **env: str) -> ServiceProcess:
        base = {
            "STT_DATABASE_URL": self.database_url,
            "STT_DATA_DIR": self.data_dir,
            "STT_REAP_INTERVAL_SECONDS": "0.3",
            "STT_RECONCILE_SECONDS": "1",
            "STT_REDIS_PREFIX": self.redis_prefix,
        }
        if self.redis_url:
            base["STT_REDIS_URL"] = self.redis_url
        p = ServiceProcess("jobstore", env={**base, **env})
        self.procs.append(p)
        self.jobstore_proc = p
        return await p.start()

    async def gateway(self, transcribers: list[ServiceProcess], worker: str, **env: str) -> ServiceProcess:
        assert self.jobstore_proc is not None
        p = ServiceProcess(
            "gateway",
            env={
                "STT_TRANSCRIBER_ADDRESS": ",".join(t.address for t in transcribers),
                "STT_JOBSTORE_ADDRESS": self.jobstore_proc.address,
                "STT_WORKER_ID": worker,
                "STT_JOB_LEASE_SECONDS": "3",
                "STT_JOB_HEARTBEAT_SECONDS": "0.5",
                **env,
            },
        )
        self.procs.append(p)
        return await p.start()

    async def stop(self) -> None:
        for p in reversed(self.procs):
            await p.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)

    async def db(self) -> asyncpg.Connection:
        return await asyncpg.connect(self.database_url.replace("postgresql+asyncpg", "postgresql"))


class RedisServer:
    """A private redis-server on a free loopback port, so a test may flush, kill and restart it."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="stt-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        for _ in range(100):
            r = await asyncio.create_subprocess_exec(
                "redis-cli", "-p", str(self.port), "ping", stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            out, _ = await r.communicate()
            if out.strip() == b"PONG":
                return
            await asyncio.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    async def command(self, *args: str) -> str:
        r = await asyncio.create_subprocess_exec(
            "redis-cli", "-p", str(self.port), *args, stdout=asyncio.subprocess.PIPE
        )
        out, _ = await r.communicate()
        return out.decode().strip()

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
