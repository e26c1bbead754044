"""Shared fixtures: real servers on port 0 in-process (one model load per session), spoken audio."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import pytest

from services.gateway.config import GatewaySettings
from services.gateway.server import Gateway
from services.gateway.server import create_server as create_gateway
from services.jobstore.config import JobstoreSettings
from services.jobstore.server import JobstoreApp
from services.jobstore.server import create_server as create_jobstore
from services.shared.logging import setup_logging
from services.transcriber.config import TranscriberSettings
from services.transcriber.server import Transcriber
from services.transcriber.server import create_server as create_transcriber
from stt.client import AsyncClient
from tests.support import audio

os.environ.setdefault("STT_LOG_LEVEL", "WARNING")
setup_logging(os.environ["STT_LOG_LEVEL"])

# Small limits so the limit tests stay quick; the long clip (about 73 s) fits.
GATEWAY_LIMITS = {"max_recognize_bytes": 8 * 1024 * 1024, "max_recognize_seconds": 120.0}


def transcriber_settings(**kw: object) -> TranscriberSettings:
    return TranscriberSettings(host="127.0.0.1", cpu_threads=2, **kw)  # type: ignore[arg-type]


def jobstore_settings(data_dir: str, **kw: object) -> JobstoreSettings:
    return JobstoreSettings(
        host="127.0.0.1", data_dir=data_dir, reap_interval_seconds=0.2, reconcile_seconds=0.5, **kw
    )  # type: ignore[arg-type]


def gateway_settings(transcribers: str, **kw: object) -> GatewaySettings:
    # http_port 0: every test gateway's HTTP front door on a free port (never the default 8000).
    return GatewaySettings(
        host="127.0.0.1", transcriber_address=transcribers, **{**GATEWAY_LIMITS, "http_port": 0, **kw}
    )  # type: ignore[arg-type]


@pytest.fixture(scope="session")
async def transcriber() -> AsyncIterator[Transcriber]:
    app = await create_transcriber(transcriber_settings(), port=0, load=False)
    await app.load()
    yield app
    await app.stop(0)


@pytest.fixture(scope="session")
async def jobstore(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[JobstoreApp]:
    app = await create_jobstore(jobstore_settings(str(tmp_path_factory.mktemp("jobstore"))), port=0)
    yield app
    await app.stop(0)


@pytest.fixture(scope="session")
async def gateway(transcriber: Transcriber, jobstore: JobstoreApp) -> AsyncIterator[Gateway]:
    gw = await create_gateway(
        gateway_settings(f"127.0.0.1:{transcriber.port}", jobstore_address=f"127.0.0.1:{jobstore.port}"),
        port=0,
    )
    await wait_serving(gw)
    yield gw
    await gw.stop(0)


async def wait_serving(gw: Gateway, count: int = 1) -> None:
    while gw.pool.serving_count < count:
        await asyncio.sleep(0.02)


@pytest.fixture(scope="session")
async def client(gateway: Gateway) -> AsyncIterator[AsyncClient]:
    c = AsyncClient(f"127.0.0.1:{gateway.port}", timeout=120)
    yield c
    await c.close()


@pytest.fixture(scope="session")
def short_clip() -> audio.Clip:
    return audio.conversation(audio.SENTENCES[:2], pause=0.6)


@pytest.fixture(scope="session")
def long_clip() -> audio.Clip:
    return audio.long_clip(70.0)
