"""A local multi-process cluster on loopback, wired like the Kubernetes deployment.

    make cluster            # or: python -m services.cluster [--transcribers 3] [--gateways 2]
    make cluster CLUSTER_ARGS=--tls     # mutual TLS on every hop (a development CA in DATA_DIR/certs)
    make cluster TRACING=1  # or: --tracing: traces to a local OTLP receiver (services/otlp.py)

Starts a jobstore (on PostgreSQL and Redis), N transcribers and M gateways as separate processes.
Gateways find transcribers the way they find pods behind a headless Service: they re-read the
transcriber list (a file here, DNS there) every second and balance each call over every SERVING one,
so a transcriber started later gets work within seconds. Ctrl-C stops everything.

Internal hops always carry a service token made for this run; with `tls_dir` every hop (client ->
gateway included) is mutual TLS with the certificates of `services.certs`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServiceProcess:
    """`python -m services.<name>` in its own process group. Output goes to a log file (and, with
    echo, to our stdout prefixed by the process name)."""

    def __init__(
        self,
        name: str,
        *,
        env: dict[str, str] | None = None,
        port: int = 0,
        args: list[str] | None = None,
        log_dir: str | None = None,
        label: str | None = None,
        echo: bool = False,
    ) -> None:
        self.name = name
        self.label = label or name
        self.requested_port = port
        # Gateways serve HTTP on a free port unless told otherwise (several run on one machine).
        http_default = {"STT_HTTP_PORT": "0"} if name == "gateway" else {}
        self.env = {**os.environ, "STT_HOST": "127.0.0.1", **http_default, **(env or {})}
        self.args = args or []
        self.dir = Path(log_dir or tempfile.mkdtemp(prefix=f"stt-{name}-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port_file = self.dir / f"{self.label}.port"
        self.log_path = self.dir / f"{self.label}.log"
        self.echo = echo
        self.proc: asyncio.subprocess.Process | None = None
        self._pump: asyncio.Task[None] | None = None
        self.port = port
        self.http_port: int | None = None  # a gateway's HTTP front door, once started

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self, timeout: float = 60.0) -> ServiceProcess:
        self.port_file.unlink(missing_ok=True)
        Path(f"{self.port_file}.http").unlink(missing_ok=True)
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", f"services.{self.name}", "--port", str(self.requested_port),
            "--port-file", str(self.port_file), *self.args,
            cwd=ROOT, env=self.env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        self._pump = asyncio.create_task(self._copy_output(self.proc))
        deadline = time.monotonic() + timeout
        while not self.port_file.exists():
            if self.proc.returncode is not None:
                await self._pump
                raise RuntimeError(f"{self.label} exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.label} did not start:\n{self.log()[-3000:]}")
            await asyncio.sleep(0.05)
        self.port = int(self.port_file.read_text().strip())
        http_file = Path(f"{self.port_file}.http")
        self.http_port = int(http_file.read_text().strip()) if http_file.exists() else None
        if not self.requested_port:
            self.requested_port = self.port  # a restart comes back on the same port
        return self

    async def _copy_output(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        with open(self.log_path, "ab") as log:
            async for line in proc.stdout:
                log.write(line)
                log.flush()
                if self.echo:
                    sys.stdout.write(f"[{self.label}] {line.decode(errors='replace')}")
                    sys.stdout.flush()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, sig: int) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    async def wait_exit(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        await asyncio.wait_for(self.proc.wait(), timeout)
        if self._pump:
            await asyncio.gather(self._pump, return_exceptions=True)
        return int(self.proc.returncode or 0)

    async def kill(self) -> None:
        """kill -9 the whole process group."""
        self.signal(signal.SIGKILL)
        await self.wait_exit(10)

    async def stop(self, timeout: float = 30.0) -> None:
        if not self.running:
            return
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            await self.wait_exit(timeout)
        except TimeoutError:
            await self.kill()

    @property
    def metrics_url(self) -> str | None:
        port = self.env.get("STT_METRICS_PORT")
        return f"http://127.0.0.1:{port}/metrics" if port and port != "0" else None


@dataclass
class LocalCluster:
    database_url: str
    redis_url: str | None = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "stt-cluster"
    data_dir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="stt-cluster-"))
    echo: bool = False
    # Settings for every process of a kind (env STT_*).
    transcriber_env: dict[str, str] = field(default_factory=dict)
    gateway_env: dict[str, str] = field(default_factory=dict)
    jobstore_env: dict[str, str] = field(default_factory=dict)
    metrics: bool = True
    common_env: dict[str, str] = field(default_factory=dict)
    # Mutual TLS on every hop with the development certificates in this directory (made if missing).
    tls_dir: str | None = None
    # The internal hops' shared secret (a new one per cluster unless given).
    service_token: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    transcribers: list[ServiceProcess] = field(default_factory=list)
    gateways: list[ServiceProcess] = field(default_factory=list)
    jobstore: ServiceProcess | None = None

    @property
    def transcriber_list(self) -> Path:
        return Path(self.data_dir) / "transcribers.txt"

    @property
    def logs(self) -> str:
        return os.path.join(self.data_dir, "logs")

    @property
    def gateway_target(self) -> str:
        """A client target that balances over every gateway (gRPC round_robin)."""
        return "ipv4:" + ",".join(g.address for g in self.gateways)

    def _metrics_env(self) -> dict[str, str]:
        return {"STT_METRICS_PORT": str(free_port())} if self.metrics else {}

    def _security_env(self, service: str) -> dict[str, str]:
        env = {"STT_SERVICE_TOKEN": self.service_token} if self.service_token else {}
        if self.tls_dir:
            d = self.tls_dir
            env |= {
                "STT_TLS_CERT_FILE": f"{d}/{service}.pem",
                "STT_TLS_KEY_FILE": f"{d}/{service}.key",
                "STT_TLS_CLIENT_CA_FILE": f"{d}/ca.pem",
            }
        return env

    def client_tls(self) -> dict[str, str]:
        """SDK/CLI arguments for a client of this cluster (empty without TLS)."""
        if not self.tls_dir:
            return {}
        d = self.tls_dir
        return {"tls_ca": f"{d}/ca.pem", "tls_cert": f"{d}/client.pem", "tls_key": f"{d}/client.key"}

    async def start(self, *, transcribers: int = 3, gateways: int = 2) -> LocalCluster:
        os.makedirs(self.data_dir, exist_ok=True)
        if self.tls_dir:
            from services.certs import make_dev_pki

            if not os.path.exists(os.path.join(self.tls_dir, "jobstore.pem")):
                make_dev_pki(self.tls_dir)
        self.transcriber_list.write_text("")
        await asyncio.gather(*[self.add_transcriber() for _ in range(transcribers)])
        env = {"STT_DATABASE_URL": self.database_url, "STT_DATA_DIR": self.data_dir,
               "STT_REDIS_PREFIX": self.redis_prefix, **self._metrics_env(),
               **self._security_env("jobstore"), **self.common_env, **self.jobstore_env}  # fmt: skip
        if self.redis_url:
            env["STT_REDIS_URL"] = self.redis_url
        self.jobstore = ServiceProcess(
            "jobstore", env=env, log_dir=self.logs, label="jobstore", echo=self.echo
        )
        await self.jobstore.start()
        await asyncio.gather(*[self.add_gateway() for _ in range(gateways)])
        return self

    async def add_transcriber(self, **env: str) -> ServiceProcess:
        label = f"transcriber-{len(self.transcribers) + 1}"
        p = ServiceProcess(
            "transcriber",
            env={
                "STT_CPU_THREADS": "1",
                **self._metrics_env(),
                **self._security_env("transcriber"),
                **self.common_env,
                **self.transcriber_env,
                **env,
            },
            log_dir=self.logs,
            label=label,
            echo=self.echo,
        )
        self.transcribers.append(p)
        await p.start()
        with open(self.transcriber_list, "a") as fh:
            fh.write(p.address + "\n")
        return p

    async def add_gateway(self, **env: str) -> ServiceProcess:
        assert self.jobstore is not None
        label = f"gateway-{len(self.gateways) + 1}"
        p = ServiceProcess(
            "gateway",
            env={
                "STT_TRANSCRIBER_ADDRESS": f"file:{self.transcriber_list}",
                "STT_TRANSCRIBER_REFRESH_SECONDS": "1",
                "STT_JOBSTORE_ADDRESS": self.jobstore.address,
                "STT_WORKER_ID": label,
                "STT_SPOOL_DIR": os.path.join(self.data_dir, "spool"),
                **self._metrics_env(),
                **self._security_env("gateway"),
                **self.common_env,
                **self.gateway_env,
                **env,
            },
            log_dir=self.logs,
            label=label,
            echo=self.echo,
        )
        self.gateways.append(p)
        await p.start()
        return p

    @property
    def processes(self) -> list[ServiceProcess]:
        return [*self.gateways, *([self.jobstore] if self.jobstore else []), *self.transcribers]

    async def stop(self) -> None:
        """SIGTERM everything (gateways first, so they hand jobs back), then wait."""
        for group in (self.gateways, [self.jobstore] if self.jobstore else [], self.transcribers):
            await asyncio.gather(*[p.stop() for p in group])


async def ensure_database(url: str) -> None:
    """CREATE DATABASE if it does not exist (PostgreSQL URLs only)."""
    if not url.startswith("postgresql"):
        return
    import asyncpg
    from sqlalchemy.engine import make_url

    u = make_url(url)
    conn = await asyncpg.connect(
        host=u.host or "127.0.0.1", port=u.port or 5432, user=u.username or "postgres",
        password=u.password, database="postgres",
    )  # fmt: skip
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", u.database)
        if not exists:
            await conn.execute(f'CREATE DATABASE "{u.database}"')
    finally:
        await conn.close()


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m services.cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("--transcribers", type=int, default=3)
    parser.add_argument("--gateways", type=int, default=2)
    parser.add_argument(
        "--database-url",
        default=os.environ.get("STT_DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/stt"),
    )
    parser.add_argument("--redis-url", default=os.environ.get("STT_REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--data-dir", default="./data/cluster")
    parser.add_argument("--quiet", action="store_true", help="do not echo the services' logs")
    parser.add_argument(
        "--tls",
        action="store_true",
        help="mutual TLS on every hop, with a development CA made in DATA_DIR/certs (stt certs)",
    )
    parser.add_argument(
        "--tracing",
        action="store_true",
        help="start a local OTLP receiver and send every service's traces to it",
    )
    parser.add_argument(
        "--otlp-endpoint", help="send traces to this OTLP/gRPC endpoint instead (e.g. http://127.0.0.1:4317)"
    )
    args = parser.parse_args(argv)
    await ensure_database(args.database_url)
    data_dir = os.path.abspath(args.data_dir)
    receiver = None
    trace_env: dict[str, str] = {}
    if args.tracing and not args.otlp_endpoint:
        from services.otlp import start_receiver

        os.makedirs(data_dir, exist_ok=True)
        receiver = await start_receiver(out=os.path.join(data_dir, "traces.jsonl"))
        trace_env["OTEL_EXPORTER_OTLP_ENDPOINT"] = receiver.endpoint
    elif args.otlp_endpoint:
        trace_env["OTEL_EXPORTER_OTLP_ENDPOINT"] = args.otlp_endpoint
    if trace_env:
        trace_env["OTEL_BSP_SCHEDULE_DELAY"] = "1000"  # spans show up within a second
    cluster = LocalCluster(
        args.database_url,
        args.redis_url or None,
        data_dir=data_dir,
        echo=not args.quiet,
        tls_dir=os.path.join(os.path.abspath(args.data_dir), "certs") if args.tls else None,
        common_env=trace_env,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await cluster.start(transcribers=args.transcribers, gateways=args.gateways)
        lines = [
            f"  gateways:     {', '.join(g.address for g in cluster.gateways)}",
            "  http:         "
            + ", ".join(f"http://127.0.0.1:{g.http_port}/" for g in cluster.gateways if g.http_port),
            f"  transcribers: {', '.join(t.address for t in cluster.transcribers)}",
            f"                (the gateways re-read {cluster.transcriber_list} every second)",
            f"  jobstore:     {cluster.jobstore.address if cluster.jobstore else '-'} on {args.database_url}",
            f"  logs:         {cluster.logs}",
            f"  try:          STT_SERVER={cluster.gateway_target} stt transcribe FILE",
        ]
        if cluster.tls_dir:
            d = cluster.tls_dir
            lines.append(
                f"  mutual TLS:   add --tls-ca {d}/ca.pem --tls-cert {d}/client.pem --tls-key {d}/client.key"
                " --tls-server-name gateway"
            )
        metrics = [p.metrics_url for p in cluster.processes if p.metrics_url]
        lines.append(f"  metrics:      {metrics[0]} (and {len(metrics) - 1} more: each process)")
        if receiver is not None and receiver.receiver.out is not None:
            out = receiver.receiver.out
            lines += [
                f"  traces:       OTLP receiver on {receiver.endpoint}, spans appended to {out}",
                f"                python -m services.otlp show {out}   (the latest traces as trees)",
            ]
        elif args.otlp_endpoint:
            lines.append(f"  traces:       sent to {args.otlp_endpoint}")
        print("cluster is up:\n" + "\n".join(lines), flush=True)
        await stop.wait()
    finally:
        print("stopping the cluster...", flush=True)
        await cluster.stop()
        if receiver is not None:
            await receiver.stop()


if __name__ == "__main__":
    asyncio.run(main())
