"""The whole stack in one process on loopback: `stt up` (and `make run`).

Each service runs its real gRPC server (on a loopback port) exactly as it does in its own process
or pod; only the addresses are wired here. Jobs and audio live in the data directory (SQLite and
files, scratch space in <data>/spool), so a restart resumes queued and running jobs and removes
whatever the previous run left half-written.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import secrets
from dataclasses import dataclass, field

from pydantic import SecretStr

from services.gateway.auth import Authenticator
from services.gateway.config import GatewaySettings
from services.gateway.server import Gateway
from services.gateway.server import create_server as create_gateway
from services.jobstore.config import JobstoreSettings
from services.jobstore.server import JobstoreApp
from services.jobstore.server import create_server as create_jobstore
from services.shared.security import check_exposure
from services.shared.server import RunningServer, run_until_signalled
from services.transcriber.config import TranscriberSettings
from services.transcriber.server import Transcriber
from services.transcriber.server import create_server as create_transcriber

log = logging.getLogger("stt.up")


@dataclass
class Stack:
    gateway: Gateway
    transcriber: Transcriber
    jobstore: JobstoreApp
    _stopped: bool = field(default=False)

    @property
    def port(self) -> int:
        return self.gateway.port

    @property
    def http_port(self) -> int | None:
        return self.gateway.http_port

    @property
    def servers(self) -> list[RunningServer]:
        """In stop order: the public surface first, then the state, the model last."""
        return [self.gateway.running, self.jobstore.running, self.transcriber.running]

    async def wait_ready(self, timeout: float = 120.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not (self.transcriber.engine.ready and self.gateway.pool.serving_count):
            if loop.time() > deadline:
                raise TimeoutError("the stack did not become ready")
            await asyncio.sleep(0.05)

    async def stop(self, grace: float | None = None) -> None:
        if self._stopped:
            return
        self._stopped = True
        for server in self.servers:
            await server.stop(grace)


async def start_stack(
    *,
    port: int = 50051,
    host: str = "127.0.0.1",
    data_dir: str = "./data",
    gateway_settings: GatewaySettings | None = None,
    transcriber_settings: TranscriberSettings | None = None,
    jobstore_settings: JobstoreSettings | None = None,
    http_port: int | None = None,
) -> Stack:
    """`http_port`: the HTTP front door's port (default STT_HTTP_PORT, 8000); it is off when the
    gateway settings say `http_enabled=False`."""
    # The internal servers listen on loopback; a token made for this run still keeps other local
    # users off them (they see every tenant's audio).
    gset = gateway_settings or GatewaySettings()
    # What would refuse the gateway's start (no keys off loopback, bad key entries) refuses it before
    # the model is loaded and the other services are up.
    check_exposure(
        "gateway",
        host,
        authenticated=Authenticator(gset.api_key_entries()).enabled,
        allow_anonymous=gset.allow_anonymous,
    )
    token = {"service_token": gset.service_token or SecretStr(secrets.token_urlsafe(32))}
    tset = (transcriber_settings or TranscriberSettings()).model_copy(update=token)
    transcriber = await create_transcriber(tset, host="127.0.0.1", port=0)
    jset = (jobstore_settings or JobstoreSettings()).model_copy(
        update={"data_dir": data_dir, "requeue_running_on_start": True, **token}
    )
    try:
        jobstore = await create_jobstore(jset, host="127.0.0.1", port=0)
    except BaseException:
        await transcriber.stop(0)
        raise
    gset = gset.model_copy(
        update={
            "transcriber_address": f"127.0.0.1:{transcriber.port}",
            "jobstore_address": f"127.0.0.1:{jobstore.port}",
            **token,
            # Uploads and job audio are spooled on the data volume, with the jobs.
            "spool_dir": os.path.join(data_dir, "spool"),
        }
    )
    try:
        gateway = await create_gateway(gset, host=host, port=port, http_port=http_port)
    except BaseException:
        await jobstore.stop(0)
        await transcriber.stop(0)
        raise
    return Stack(gateway, transcriber, jobstore)


async def run(
    port: int, data_dir: str, host: str = "127.0.0.1", *, http: bool = True, http_port: int | None = None
) -> None:
    gset = GatewaySettings()
    if not http:
        gset = gset.model_copy(update={"http_enabled": False})
    stack = await start_stack(
        port=port, host=host, data_dir=data_dir, gateway_settings=gset, http_port=http_port
    )
    try:
        await stack.wait_ready()
        log.info(
            "ready: gateway on %s:%d, data in %s (try: stt --server localhost:%d transcribe FILE)",
            host,
            stack.port,
            data_dir,
            stack.port,
        )
        if stack.http_port is not None:
            shown = "localhost" if host in ("127.0.0.1", "0.0.0.0", "::", "::1") else host
            log.info(
                "http: page http://%s:%d/ , OpenAI-compatible API http://%s:%d/v1 , docs http://%s:%d/docs",
                shown, stack.http_port, shown, stack.http_port, shown, stack.http_port,
            )  # fmt: skip
    except TimeoutError:
        log.error("model did not load; see the errors above")
    await run_until_signalled(stack.servers)


def cli(args: argparse.Namespace) -> int:
    """`stt up` (the SDK's CLI finds this through the `stt.server` entry point)."""
    from services.shared import tracing
    from services.shared.config import CommonSettings
    from services.shared.logging import setup_logging

    common = CommonSettings()
    setup_logging(common.log_level, common.log_format)
    tracing.configure("up", common.tracing)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(
                run(
                    args.port,
                    args.data_dir,
                    host=args.host,
                    http=not getattr(args, "no_http", False),
                    http_port=getattr(args, "http_port", None),
                )
            )
    finally:
        tracing.shutdown()
    return 0
