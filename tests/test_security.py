"""Authentication, read-only keys, quotas and admission, tenant isolation, internal-service auth,
TLS with certificate reload, fail-closed start and the access log — through real gRPC servers
in this process (the system tests in test_security_system.py do the same with real processes)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import shutil
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.certs import issue, make_dev_pki
from services.gateway.auth import Authenticator, parse_keys
from services.gateway.quotas import ByteBudget, Quotas, TenantQuota
from services.gateway.server import create_server as create_gateway
from services.jobstore.server import create_server as create_jobstore
from services.shared.errors import QuotaExceeded, Unauthenticated
from services.shared.internal.v1 import jobstore_pb2, jobstore_pb2_grpc
from services.shared.security import ANONYMOUS_WARNING, StartRefused, check_exposure
from stt.client import AsyncClient
from stt.errors import SttError
from stt.v1 import common_pb2, jobs_pb2, speech_pb2
from tests.conftest import gateway_settings, jobstore_settings, wait_serving
from tests.support import audio
from tests.support.speech import held_stream
from tests.support.waiting import until

KEY_A, KEY_A2, KEY_B, KEY_RO, KEY_S = "key-acme-1", "key-acme-2", "key-beta", "key-acme-readonly", "key-slow"
KEYS = (
    f"{KEY_A}:acme,sha256:{hashlib.sha256(KEY_A2.encode()).hexdigest()}:acme,{KEY_B}:beta,{KEY_RO}:acme:ro,"
    f"{KEY_S}:slow"
)
QUOTAS = {
    "acme": {"concurrent_streams": 1, "queued_jobs": 3, "max_priority": "normal"},
    "slow": {"requests_per_second": 2},
}


def test_key_entries_plain_hashed_read_only_and_bad():
    entries = parse_keys(KEYS)
    assert [(e.caller.tenant, e.caller.read_only) for e in entries] == [
        ("acme", False), ("acme", False), ("beta", False), ("acme", True), ("slow", False)
    ]  # fmt: skip
    auth = Authenticator(KEYS)
    a1, a2 = auth.authenticate(KEY_A), auth.authenticate(KEY_A2)
    assert a1.tenant == a2.tenant == "acme" and a1.key_id != a2.key_id
    assert KEY_A not in a1.key_id and auth.authenticate(KEY_RO).read_only
    for bad in ("", "nope", KEY_A + " x", hashlib.sha256(KEY_A2.encode()).hexdigest()):
        with pytest.raises(Unauthenticated):
            auth.authenticate(bad)
    for broken in ("sha256:abc:t", "sha256:" + "g" * 64 + ":t", f"k:{'t' * 200}"):
        with pytest.raises(ValueError):
            parse_keys(broken)


def test_fail_closed_start_rule():
    assert check_exposure("gateway", "127.0.0.1", authenticated=False, allow_anonymous=False) is False
    assert check_exposure("gateway", "::1", authenticated=False, allow_anonymous=False) is False
    assert check_exposure("gateway", "0.0.0.0", authenticated=True, allow_anonymous=False) is False
    for host in ("0.0.0.0", "::", "10.1.2.3", "gateway.example"):
        with pytest.raises(StartRefused):
            check_exposure("gateway", host, authenticated=False, allow_anonymous=False)
    assert check_exposure("jobstore", "0.0.0.0", authenticated=False, allow_anonymous=True) is True


async def test_stt_up_off_loopback_without_keys_refuses_before_loading_anything(monkeypatch, tmp_path):
    """`stt up --host 0.0.0.0` without keys: refused before the transcriber (the model) and the
    jobstore start, so nothing is left to stop (it used to print two tracebacks on the way out)."""
    from services import embedded

    started: list[str] = []

    async def not_expected(*args: object, **kwargs: object) -> None:
        started.append("a service")

    monkeypatch.setattr(embedded, "create_transcriber", not_expected)
    monkeypatch.setattr(embedded, "create_jobstore", not_expected)
    with pytest.raises(StartRefused, match="STT_API_KEYS"):
        await embedded.start_stack(host="0.0.0.0", port=0, data_dir=str(tmp_path), http_port=0)
    assert started == []


async def test_a_gateway_off_loopback_without_keys_refuses_to_start(transcriber, jobstore):
    settings = gateway_settings(
        f"127.0.0.1:{transcriber.port}", jobstore_address=f"127.0.0.1:{jobstore.port}"
    )
    with pytest.raises(StartRefused, match="STT_API_KEYS"):
        await create_gateway(settings.model_copy(update={"host": "0.0.0.0"}), port=0)
    with pytest.raises(StartRefused, match="service token"):
        await create_jobstore(jobstore_settings("/tmp/unused"), port=0, host="0.0.0.0")
    # Explicitly anonymous: starts, and says so in its health list.
    gw = await create_gateway(
        settings.model_copy(update={"host": "0.0.0.0", "allow_anonymous": True}), port=0
    )
    try:
        async with AsyncClient(f"127.0.0.1:{gw.port}") as c:
            assert (await c.health())[ANONYMOUS_WARNING] == "SERVING"
    finally:
        await gw.stop(0)


# -- a gateway with keys and quotas, on its own jobstore, without a dispatcher (jobs stay queued) --


@pytest.fixture(scope="module")
async def keyed(transcriber, tmp_path_factory) -> AsyncIterator:
    js = await create_jobstore(jobstore_settings(str(tmp_path_factory.mktemp("keyed"))), port=0)
    gw = await create_gateway(
        gateway_settings(
            f"127.0.0.1:{transcriber.port}",
            jobstore_address=f"127.0.0.1:{js.port}",
            api_keys=KEYS,
            tenant_quotas=json.dumps(QUOTAS),
            dispatch_concurrency=0,
        ),
        port=0,
    )
    await wait_serving(gw)
    clients = {
        k: AsyncClient(f"127.0.0.1:{gw.port}", api_key=k, timeout=60)
        for k in (KEY_A, KEY_A2, KEY_B, KEY_RO, KEY_S)
    }
    yield gw, clients
    for c in clients.values():
        await c.close()
    await gw.stop(0)
    await js.stop(0)


def wav(seconds: float = 0.5) -> bytes:
    return audio.encode(audio.silence(seconds), "wav")


async def test_calls_without_a_valid_key_are_refused_and_health_stays_open(keyed):
    gw, _ = keyed
    for key in (None, "wrong"):
        async with AsyncClient(f"127.0.0.1:{gw.port}", api_key=key or "") as c:
            with pytest.raises(SttError) as err:
                await c.server_info()
            assert err.value.code == grpc.StatusCode.UNAUTHENTICATED and err.value.reason == "UNAUTHENTICATED"
            assert (await c.health())[""] == "SERVING"


async def test_caller_info_names_tenant_key_and_quotas(keyed):
    _, clients = keyed
    info = (await clients[KEY_A].server_info()).caller
    assert (info.tenant, info.read_only, info.max_priority) == ("acme", False, jobs_pb2.PRIORITY_NORMAL)
    assert info.key_id == hashlib.sha256(KEY_A.encode()).hexdigest()[:12]
    quotas = {q.name: q.limit for q in info.quotas}
    assert quotas["concurrent_streams"] == 1 and quotas["queued_jobs"] == 3
    assert (await clients[KEY_A2].server_info()).caller.tenant == "acme"
    assert (await clients[KEY_RO].server_info()).caller.read_only


async def test_read_only_keys_may_read_but_not_write(keyed):
    _, clients = keyed
    job = await clients[KEY_A].submit(wav())
    ro = clients[KEY_RO]
    assert (await ro.get_job(job.job_id)).job_id == job.job_id
    assert job.job_id in [j.job_id for j in (await ro.list_jobs()).jobs]
    await ro.queue_stats()
    for write in (
        lambda: ro.submit(wav()),
        lambda: ro.cancel_job(job.job_id),
        lambda: ro.delete_job(job.job_id),
        lambda: ro.retry_job(job.job_id),
        lambda: ro.recognize(wav()),
    ):
        with pytest.raises(SttError) as err:
            await write()
        assert err.value.code == grpc.StatusCode.PERMISSION_DENIED and err.value.reason == "READ_ONLY_KEY"
    await clients[KEY_A].cancel_job(job.job_id)


async def test_tenants_cannot_reach_each_others_jobs_through_any_rpc(keyed):
    _, clients = keyed
    a, b = clients[KEY_A], clients[KEY_B]
    job = await a.submit(wav())
    calls = {
        "get": lambda: b.get_job(job.job_id),
        "watch": lambda: b.wait(job.job_id),
        "cancel": lambda: b.cancel_job(job.job_id),
        "retry": lambda: b.retry_job(job.job_id),
        "delete": lambda: b.delete_job(job.job_id),
        "transcript": lambda: b.transcript(job.job_id),
    }
    for name, call in calls.items():
        with pytest.raises(SttError) as err:
            await call()
        assert err.value.code == grpc.StatusCode.NOT_FOUND, name
    assert job.job_id not in [j.job_id for j in (await b.list_jobs()).jobs]
    assert (await a.get_job(job.job_id)).status == jobs_pb2.JOB_STATUS_QUEUED  # untouched
    await a.cancel_job(job.job_id)


async def test_priority_and_queued_job_quotas(keyed):
    _, clients = keyed
    a = clients[KEY_A]
    with pytest.raises(SttError) as err:
        await a.submit(wav(), priority="high")
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and err.value.reason == "PRIORITY_NOT_ALLOWED"
    jobs = [await a.submit(wav()) for _ in range(3)]
    with pytest.raises(SttError) as err:
        await a.submit(wav())
    e = err.value
    assert e.reason == "QUOTA_EXCEEDED" and e.quota_subjects == ["tenant:acme"]
    assert e.quota[0].startswith("queued_jobs") and e.retry_after is not None
    stats = {q.name: q for q in (await a.queue_stats()).quotas}
    assert stats["queued_jobs"].used == 3 and stats["queued_jobs"].limit == 3
    await clients[KEY_B].submit(wav())  # another tenant is not affected
    for j in jobs:
        await a.cancel_job(j.job_id)
    await a.cancel_job((await a.submit(wav())).job_id)


async def test_a_second_stream_over_the_quota_is_refused(keyed):
    _, clients = keyed
    a = clients[KEY_A]
    async with held_stream(a):
        # The first stream holds its slot once the server has its config.
        await until(lambda: bool(keyed[0].quotas.in_use.get(("acme", "concurrent_streams"))), timeout=10)
        with pytest.raises(SttError) as err:
            async for _ in a.stream([b"\x00\x00" * 1600]):
                pass
        e = err.value
        assert e.code == grpc.StatusCode.RESOURCE_EXHAUSTED and e.reason == "QUOTA_EXCEEDED"
        assert e.quota_subjects == ["tenant:acme"] and e.quota[0].startswith("concurrent_streams")
        async for _ in clients[KEY_B].stream([b"\x00\x00" * 1600]):  # beta has its own quota
            pass


async def test_request_rate_limit(keyed):
    _, clients = keyed
    refused = None
    for _ in range(8):
        try:
            await clients[KEY_S].server_info()
        except SttError as exc:
            refused = exc
            break
    assert refused is not None and refused.reason == "RATE_LIMITED"
    assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED and refused.retry_after is not None
    await asyncio.sleep(refused.retry_after + 0.05)
    await clients[KEY_S].server_info()


async def test_inflight_bytes_bound_waits_then_refuses(keyed):
    gw, clients = keyed
    held = await gw.budget.reserve(gw.budget.limit)  # the gateway's memory is taken
    gw.budget.wait = 0.3
    try:
        with pytest.raises(SttError) as err:
            await clients[KEY_A].recognize(wav())
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and err.value.reason == "SERVER_BUSY"
        assert err.value.retry_after is not None
        gw.budget.wait = 10.0
        call = asyncio.ensure_future(clients[KEY_A].recognize(wav()))
        await asyncio.sleep(0.3)
        assert not call.done()  # waiting for room, its body not yet read
        held.release()
        assert (await call).metadata.audio_duration_seconds > 0
    finally:
        held.release()
        gw.budget.wait = 10.0
    assert gw.budget.used == 0


async def test_byte_budget_accounting():
    budget = ByteBudget(100, wait=0.2)
    a = await budget.reserve(60)
    with pytest.raises(QuotaExceeded):
        await budget.reserve(50)
    waiter = asyncio.ensure_future(budget.reserve(50))
    await asyncio.sleep(0.05)
    a.resize(10)
    b = await waiter
    assert budget.used == 60
    b.release()
    a.release()
    big = await budget.reserve(500)  # larger than the budget: admitted alone
    big.release()
    assert budget.used == 0


def test_quota_config_validation():
    default = TenantQuota(concurrent_streams=5)
    q = Quotas(default, {})
    assert q.of("anyone").concurrent_streams == 5
    from services.gateway.quotas import parse_tenant_quotas

    parsed = parse_tenant_quotas('{"x": {"queued_jobs": 2, "max_priority": "low"}}', default)
    assert parsed["x"].queued_jobs == 2 and parsed["x"].concurrent_streams == 5
    for bad in (
        '{"x": {"bogus": 1}}',
        '{"x": {"queued_jobs": -1}}',
        "[1]",
        "{",
        '{"x": {"max_priority": "urgent"}}',
    ):
        with pytest.raises(ValueError):
            parse_tenant_quotas(bad, default)


async def test_access_log_names_tenant_key_and_audio_bytes_never_the_key(keyed, caplog):
    _, clients = keyed
    data = wav()
    with caplog.at_level(logging.INFO, logger="access"):
        await clients[KEY_A].recognize(data)
        with pytest.raises(SttError):
            await clients[KEY_RO].submit(data)
    lines = [r for r in caplog.records if r.name == "access" and "Speech/Recognize" in r.getMessage()]
    rec = lines[-1]
    assert (rec.tenant, rec.audio_bytes, rec.status) == ("acme", len(data), "OK")  # type: ignore[attr-defined]
    assert rec.key_id == hashlib.sha256(KEY_A.encode()).hexdigest()[:12]  # type: ignore[attr-defined]
    denied = [r for r in caplog.records if r.name == "access" and "CreateJob" in r.getMessage()][-1]
    assert denied.status == "PERMISSION_DENIED" and denied.tenant == "acme"  # type: ignore[attr-defined]
    for r in caplog.records:
        assert all(k not in str(r.__dict__) for k in (KEY_A, KEY_RO))


# -- internal services ----------------------------------------------------------------------------


async def test_jobstore_requires_its_token_and_a_tenant(tmp_path):
    js = await create_jobstore(jobstore_settings(str(tmp_path), service_token="s3cret"), port=0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{js.port}") as ch:
            stub = jobstore_pb2_grpc.JobStoreStub(ch)
            for md in ((), (("x-service-token", "wrong"),)):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.GetJob(jobstore_pb2.StoreGetJobRequest(tenant="t", job_id="x"), metadata=md)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            ok = (("x-service-token", "s3cret"),)
            for call in (
                stub.GetJob(jobstore_pb2.StoreGetJobRequest(job_id="x"), metadata=ok),
                stub.CancelJob(jobstore_pb2.StoreJobRef(job_id="x"), metadata=ok),
                stub.ListJobs(jobstore_pb2.StoreListJobsRequest(), metadata=ok),
                stub.GetTenantUsage(jobstore_pb2.TenantUsageRequest(), metadata=ok),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as err:  # all tenants: allowed, the job is unknown
                await stub.GetJob(jobstore_pb2.StoreGetJobRequest(job_id="x", all_tenants=True), metadata=ok)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING  # probes need no token
    finally:
        await js.stop(0)


def _serial(port: int, pki: Path) -> int:
    """The serial of the certificate a server presents to a new connection."""
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    ctx.load_cert_chain(str(pki / "gateway.pem"), str(pki / "gateway.key"))
    ctx.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port)) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as s,
    ):
        der = s.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


async def test_mtls_between_services_and_certificate_reload(transcriber, tmp_path):
    pki = make_dev_pki(tmp_path / "pki")
    live = tmp_path / "live"
    live.mkdir()
    for name in ("jobstore.pem", "jobstore.key"):
        shutil.copy(pki / name, live / name)
    tls = {"tls_client_ca_file": str(pki / "ca.pem")}
    js = await create_jobstore(
        jobstore_settings(
            str(tmp_path / "data"),
            tls_cert_file=str(live / "jobstore.pem"),
            tls_key_file=str(live / "jobstore.key"),
            **tls,
        ),
        port=0,
    )
    gw = await create_gateway(
        gateway_settings(
            f"127.0.0.1:{transcriber.port}",
            jobstore_address=f"localhost:{js.port}",
            dispatch_concurrency=0,
            tls_cert_file=str(pki / "gateway.pem"),
            tls_key_file=str(pki / "gateway.key"),
            **tls,
        ),
        port=0,
    )
    try:  # (the session's transcriber is plaintext: this gateway never reaches it; jobs stay queued)
        client_tls = {
            "tls_ca": str(pki / "ca.pem"),
            "tls_cert": str(pki / "client.pem"),
            "tls_key": str(pki / "client.key"),
        }
        async with AsyncClient(f"localhost:{gw.port}", **client_tls) as c:
            job = await c.submit(wav())  # gateway -> jobstore over mutual TLS
            assert (await c.get_job(job.job_id)).job_id == job.job_id
        async with AsyncClient(f"127.0.0.1:{gw.port}", tls=False, timeout=5) as plain:
            with pytest.raises(SttError) as err:
                await plain.server_info()
            assert err.value.code == grpc.StatusCode.UNAVAILABLE
        before = await asyncio.to_thread(_serial, js.port, pki)
        # cert-manager renews: the files are replaced; new connections get the new certificate.
        ca = (x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes()), _ca_key(pki))
        issue(live, "jobstore", ca, dns=["localhost"], ips=["127.0.0.1"])
        assert await asyncio.to_thread(_serial, js.port, pki) != before
        assert js.running.tls is not None and js.running.tls.reloads == 1
        async with AsyncClient(f"localhost:{gw.port}", **client_tls) as c:
            assert (await c.get_job(job.job_id)).job_id == job.job_id
    finally:
        await gw.stop(0)
        await js.stop(0)


def _ca_key(pki: Path):  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives import serialization

    return serialization.load_pem_private_key((pki / "ca.key").read_bytes(), password=None)


async def test_http2_streams_per_connection_are_capped(gateway, tmp_path):
    """A client gets at most max_concurrent_streams calls at once on one connection."""
    from tests.conftest import transcriber_settings  # noqa: F401  (the session servers are up)

    assert gateway.speech.settings.max_concurrent_streams == 100
    server = await create_jobstore(jobstore_settings(str(tmp_path), max_concurrent_streams=2), port=0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            watches = [stub.Watch(health_pb2.HealthCheckRequest()) for _ in range(2)]
            for w in watches:
                await w.read()
            with pytest.raises(grpc.aio.AioRpcError) as err:  # the third waits for a free stream
                await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            watches[0].cancel()
            assert (await stub.Check(health_pb2.HealthCheckRequest(), timeout=5.0)).status
            watches[1].cancel()
    finally:
        await server.stop(0)


async def test_unknown_encoding_and_nan_are_invalid_argument(client):
    bad = [
        ({"encoding": 99}, "config.encoding"),
        ({"temperature": float("nan")}, "config.temperature"),
        ({"language_code": "x" * 8000}, "config.language_code"),
    ]
    for kw, field in bad:
        cfg = common_pb2.RecognitionConfig(**kw)  # type: ignore[arg-type]
        with pytest.raises(SttError) as err:
            await client.recognize(wav(), config=cfg)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and field in err.value.fields
        assert len(err.value.message) < 1024
    with pytest.raises(SttError) as err:
        async for _ in client.stream(
            [b"\x00\x00" * 160],
            config=common_pb2.RecognitionConfig(encoding=99, sample_rate_hz=16000),  # type: ignore[arg-type]
        ):
            pass
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    _ = speech_pb2  # the public stubs are what the SDK sends
