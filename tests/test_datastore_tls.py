"""The jobstore on PostgreSQL and Redis over TLS: a private PostgreSQL (ssl=on) and redis-server
(--tls-port) with certificates from `services.certs`, reached with libpq-style `sslmode` URLs and
`rediss://` — and refused without TLS or with the wrong CA."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from services.certs import make_dev_pki
from services.jobstore import db
from services.jobstore.events import EventBus
from services.shared.tls import TlsFiles
from tests.support.procs import free_port

pytestmark = pytest.mark.system
PG_BIN = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"))), None)


@pytest.fixture(scope="module")
def pki() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="stt-dbtls-"))
    make_dev_pki(d)
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def tls_postgres(pki: Path) -> Iterator[int]:
    """A private PostgreSQL with ssl=on on a free port (run as the postgres user: initdb refuses root)."""
    if PG_BIN is None or not shutil.which("runuser"):
        pytest.fail("PostgreSQL server binaries are needed (Debian: postgresql)")
    data = Path(tempfile.mkdtemp(prefix="stt-pgtls-"))
    for name in ("jobstore.pem", "jobstore.key", "ca.pem"):
        shutil.copy(pki / name, data / name)
    shutil.chown(data, "postgres", "postgres")
    for f in data.iterdir():
        shutil.chown(f, "postgres", "postgres")
    os.chmod(data / "jobstore.key", 0o600)
    port = free_port()
    pgdata = data / "pg"

    def pg(*args: str) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", *args], check=True, capture_output=True, timeout=120
        )

    pg(str(PG_BIN / "initdb"), "-D", str(pgdata), "-A", "trust", "-U", "postgres")
    with open(pgdata / "postgresql.conf", "a") as fh:
        fh.write(
            f"port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{data}'\n"
            f"ssl = on\nssl_cert_file = '{data}/jobstore.pem'\nssl_key_file = '{data}/jobstore.key'\n"
        )
    # TLS only: plaintext TCP connections are rejected.
    (pgdata / "pg_hba.conf").write_text("hostssl all all 127.0.0.1/32 trust\nlocal all all trust\n")
    pg(str(PG_BIN / "pg_ctl"), "-D", str(pgdata), "-l", str(data / "log"), "-w", "start")
    try:
        yield port
    finally:
        pg(str(PG_BIN / "pg_ctl"), "-D", str(pgdata), "-m", "immediate", "stop")
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(scope="module")
def tls_redis(pki: Path) -> Iterator[int]:
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", str(pki / "jobstore.pem"), "--tls-key-file", str(pki / "jobstore.key"),
         "--tls-ca-cert-file", str(pki / "ca.pem"), "--tls-auth-clients", "no",
         "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield port
    finally:
        proc.kill()
        proc.wait()


async def _select(url: str) -> int:
    engine = db.create_engine(url)
    try:
        async with engine.connect() as conn:
            return int(
                (
                    await conn.execute(text("SELECT 1 FROM pg_stat_ssl WHERE pid = pg_backend_pid() AND ssl"))
                ).scalar_one()
            )
    finally:
        await engine.dispose()


async def test_postgres_over_tls_with_sslmode_urls(tls_postgres, pki):
    base = f"postgresql+asyncpg://postgres@127.0.0.1:{tls_postgres}/postgres"
    assert await _select(f"{base}?sslmode=require") == 1
    assert await _select(f"{base}?sslmode=verify-full&sslrootcert={pki}/ca.pem") == 1
    assert (
        await _select(
            f"{base}?sslmode=verify-ca&sslrootcert={pki}/ca.pem&sslcert={pki}/client.pem&sslkey={pki}/client.key"
        )
        == 1
    )
    with pytest.raises(DBAPIError, match="no encryption"):
        await _select(f"{base}?sslmode=disable")  # the server accepts TLS only
    other = make_dev_pki(pki / "other-ca")
    with pytest.raises(Exception, match="(?i)certificate"):
        await _select(f"{base}?sslmode=verify-full&sslrootcert={other}/ca.pem")


async def test_redis_over_tls_with_a_rediss_url(tls_redis, pki):
    bus = EventBus(f"rediss://127.0.0.1:{tls_redis}/0?ssl_ca_certs={pki}/ca.pem", prefix="tls-test")
    await bus.start()
    try:
        fut = bus.job_future("job-1")
        await bus.publish_job("job-1")
        await asyncio.wait_for(fut, 10)
    finally:
        await bus.close()


async def test_jobstore_service_on_tls_datastores(tls_postgres, tls_redis, pki, tmp_path):
    """The whole jobstore started on both, as a deployment would configure it."""
    from services.jobstore.config import JobstoreSettings
    from services.jobstore.server import create_server

    settings = JobstoreSettings(
        host="127.0.0.1",
        data_dir=str(tmp_path),
        database_url=f"postgresql+asyncpg://postgres@127.0.0.1:{tls_postgres}/postgres?sslmode=verify-full&sslrootcert={pki}/ca.pem",
        redis_url=f"rediss://127.0.0.1:{tls_redis}/0?ssl_ca_certs={pki}/ca.pem",
    )
    app = await create_server(settings, port=0)
    try:
        assert (await app.store.tenant_usage("t")).queued_jobs == 0
    finally:
        await app.stop(0)
    assert TlsFiles().enabled is False
