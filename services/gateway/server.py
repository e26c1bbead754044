"""Builds the gateway: transcriber pool, jobstore client, public Speech and Jobs servicers, and the
job dispatcher, on one gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc

from services.gateway.audio import Limits
from services.gateway.auth import DENIED, Authenticator, AuthInterceptor, current_caller
from services.gateway.config import GatewaySettings
from services.gateway.dispatcher import Dispatcher, DispatcherConfig, default_worker_id
from services.gateway.http.context import HttpContext
from services.gateway.http.server import HttpServer
from services.gateway.jobs import JobsAPI
from services.gateway.jobs_servicer import JobsServicer
from services.gateway.jobstore_client import JobstoreClient
from services.gateway.pool import TranscriberPool
from services.gateway.quotas import ByteBudget, Quotas, inflight_var
from services.gateway.speech import BODY_COPIES, JobLimits, SpeechAPI
from services.gateway.speech_servicer import SpeechServicer
from services.shared.channel import InternalCredentials
from services.shared.context import call_cleanups_var
from services.shared.errors import ServiceError
from services.shared.metrics import TRANSCRIBERS, set_known_tenants
from services.shared.security import check_exposure, guarded
from services.shared.server import NOT_SERVING, SERVING, RunningServer, Service, start_server
from services.shared.spool import Spool
from stt.v1 import jobs_pb2, jobs_pb2_grpc, speech_pb2, speech_pb2_grpc

log = logging.getLogger("gateway")

SPEECH = speech_pb2.DESCRIPTOR.services_by_name["Speech"].full_name
JOBS = jobs_pb2.DESCRIPTOR.services_by_name["Jobs"].full_name
# Health entries that report the gateway's view of its dependencies (for `stt health`).
DEP_TRANSCRIBERS = "dependency/transcribers"


@dataclass
class Gateway:
    running: RunningServer
    pool: TranscriberPool
    jobstore: JobstoreClient
    dispatcher: Dispatcher | None
    speech: SpeechAPI
    jobs: JobsAPI
    auth: Authenticator
    quotas: Quotas
    budget: ByteBudget
    http: HttpServer | None = None

    @property
    def port(self) -> int:
        return self.running.port

    @property
    def http_port(self) -> int | None:
        """The HTTP front door's port (None when it is off)."""
        return self.http.port if self.http is not None else None

    async def stop(self, grace: float | None = None) -> None:
        if self.http is not None and grace is not None:
            self.http.grace = grace
        await self.running.stop(grace)


async def create_server(
    settings: GatewaySettings,
    *,
    port: int | None = None,
    host: str | None = None,
    http_port: int | None = None,
) -> Gateway:
    """The gateway's gRPC server and, unless `settings.http_enabled` is off, its HTTP front door on
    `http_port` (default `settings.http_port`; 0 picks a free port), on the same event loop."""
    host = host if host is not None else settings.host
    # Fail closed: bad key entries or quotas stop the start; no keys off loopback too (unless
    # STT_ALLOW_ANONYMOUS=true, which is warned about at start and in the health list).
    authenticator = Authenticator(settings.api_key_entries())
    anonymous = check_exposure(
        "gateway", host, authenticated=authenticator.enabled, allow_anonymous=settings.allow_anonymous
    )
    quotas = settings.quotas()
    budget = ByteBudget(settings.max_inflight_bytes, settings.inflight_wait_seconds)
    creds = InternalCredentials.from_settings(settings)
    pool = TranscriberPool(
        settings.transcriber_address,
        refresh_seconds=settings.transcriber_refresh_seconds,
        call_timeout=settings.transcriber_timeout_seconds,
        ready_wait=settings.transcriber_ready_wait_seconds,
        creds=creds,
    )
    await pool.start()
    jobstore = JobstoreClient(
        settings.jobstore_address, timeout=settings.jobstore_timeout_seconds, creds=creds
    )
    decode_slots = asyncio.Semaphore(settings.max_concurrent_decodes)
    # Scratch space for uploads and job audio: this process's own directory, so whatever a crash
    # left behind (of this or another gateway sharing the volume) is removed now and by the sweeper.
    spool = await asyncio.to_thread(Spool(settings.spool_root(), name="gateway").open)
    speech_api = SpeechAPI(settings, pool, decode_slots, quotas=quotas, budget=budget)
    jobs_api = JobsAPI(settings, jobstore, decode_slots, caps=pool.caps, spool=spool, quotas=quotas)
    max_message_bytes = settings.max_recognize_bytes + 64 * 1024

    async def server_info() -> speech_pb2.ServerInfo:
        try:
            store = await jobs_api.store_info()
            ttl, failed_ttl, attempts = store.result_ttl_seconds, store.failed_ttl_seconds, store.max_attempts
        except ServiceError:  # the jobstore is down: report what this gateway knows
            ttl, failed_ttl, attempts = 0.0, 0.0, settings.max_job_attempts
        try:
            used = await jobs_api.usage(current_caller().tenant)
            queued, stored = used.queued_jobs, used.stored_audio_bytes
        except ServiceError:
            queued, stored = 0, 0
        return speech_api.server_info(
            queued_jobs=queued,
            stored_audio_bytes=stored,
            jobs=JobLimits(
                settings.max_job_bytes, settings.max_job_seconds, settings.max_job_attempts or attempts
            ),
            result_ttl=ttl,
            failed_ttl=failed_ttl,
            max_message_bytes=max_message_bytes,
        )

    speech = SpeechServicer(speech_api, server_info)
    jobs = JobsServicer(jobs_api)
    set_known_tenants(authenticator.tenants)  # the only tenant label values (metrics)
    running = await start_server(
        [
            Service(SPEECH, lambda s: speech_pb2_grpc.add_SpeechServicer_to_server(speech, s)),
            Service(JOBS, lambda s: jobs_pb2_grpc.add_JobsServicer_to_server(jobs, s)),
        ],
        settings=settings,
        host=host,
        port=settings.gateway_port if port is None else port,
        max_message_bytes=max_message_bytes,
        interceptors=[
            AuthInterceptor(authenticator),
            RecognizeAdmission(budget, max_message_bytes),
        ],
        anonymous=anonymous,
    )
    running.on_drain(jobs_api.drain)
    # Live gRPC streams end with DRAINING at once: their clients resume them elsewhere.
    running.on_drain(speech_api.drain)
    http = None
    if settings.http_enabled:
        ctx = HttpContext(settings, speech_api, jobs_api, authenticator, server_info)
        try:
            http = HttpServer(
                ctx,
                host if host is not None else settings.host,
                settings.http_port if http_port is None else http_port,
                settings.shutdown_grace_seconds,
            )
            await http.start()
        except BaseException:
            await running.stop(0)
            await pool.close()
            await jobstore.close()
            raise
        # SIGTERM: stop accepting HTTP connections and end live sockets' audio while gRPC drains;
        # the HTTP side finishes (within the same grace) before the pool and jobstore close.
        running.on_drain(http.begin_drain)
    dispatcher = None
    if settings.dispatch_concurrency > 0:
        dispatcher = Dispatcher(
            jobstore,
            pool.transcribe,
            DispatcherConfig(
                worker_id=settings.worker_id or default_worker_id(),
                concurrency=settings.dispatch_concurrency,
                lease_seconds=settings.job_lease_seconds,
                heartbeat_seconds=settings.job_heartbeat_seconds,
                max_parallel_chunks=settings.max_parallel_windows,
                limits=Limits(settings.max_job_bytes, settings.max_job_seconds),
                vad=settings.vad(),
                spool_dir=settings.spool_dir,
            ),
            spool=spool,
            batch_capacity=pool.batch_capacity,
            replicas=lambda: pool.serving_count,
        )
        dispatcher.start()
        # On SIGTERM: stop claiming and hand held jobs back first, then drain the API calls.
        running.on_drain(dispatcher.stop)
    monitor = asyncio.create_task(_monitor_dependencies(running, pool), name="dependency-monitor")
    sweeper = asyncio.create_task(_sweep_spool(spool, settings.spool_sweep_seconds), name="spool-sweeper")

    async def stop_monitor() -> None:
        for task in (monitor, sweeper):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    rotation = asyncio.create_task(_follow_client_certificates(pool, jobstore), name="tls-rotation")

    async def stop_rotation() -> None:
        rotation.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await rotation

    async def close_spool() -> None:
        await asyncio.to_thread(spool.close)

    running.on_stop(close_spool)
    running.on_stop(pool.close)
    running.on_stop(jobstore.close)
    running.on_stop(stop_monitor)
    running.on_stop(stop_rotation)
    if http is not None:
        # After the pool and jobstore are registered, so it runs before they close.
        running.on_stop(http.stop)
    return Gateway(
        running, pool, jobstore, dispatcher, speech_api, jobs_api, authenticator, quotas, budget, http
    )


async def _follow_client_certificates(
    pool: TranscriberPool, jobstore: JobstoreClient, every: float = 10.0
) -> None:
    """Reconnect with the renewed client certificate once cert-manager replaces the files."""
    while True:
        await asyncio.sleep(every)
        pool.rotate_if_changed()
        jobstore.rotate_if_changed()


RECOGNIZE = "/stt.v1.Speech/Recognize"
# An admitted call's reservation lapses if its body has not arrived by then (a stalled upload, or a
# call that failed before its handler ran): the bytes are never held forever.
BODY_WAIT_SECONDS = 60.0


class RecognizeAdmission(grpc.aio.ServerInterceptor):
    """The gRPC door's part of the in-flight byte bound: a Recognize call reserves the largest
    body it may send *before* the body is read (gRPC reads it before the handler runs), waiting for
    room and refusing with SERVER_BUSY when there is none; SpeechAPI.recognize then resizes the
    reservation to what the call really holds."""

    def __init__(self, budget: ByteBudget, max_bytes: int) -> None:
        self.budget = budget
        self.max_bytes = max_bytes

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        caller = current_caller()
        if details.method != RECOGNIZE or not self.budget.limit or caller is DENIED or caller.read_only:
            return await continuation(details)
        try:
            reservation = await self.budget.reserve(self.max_bytes * BODY_COPIES)
        except ServiceError as exc:
            handler = await continuation(details)
            err = exc

            def refuse(context: grpc.aio.ServicerContext) -> None:
                raise err

            return guarded(handler, refuse)
        lapse = asyncio.get_running_loop().call_later(BODY_WAIT_SECONDS, reservation.release)
        # Released when the call ends however it ends (also when it fails before the handler runs,
        # e.g. a body that does not parse); the lapse covers a call that never reaches the handler.
        call_cleanups_var.set([reservation.release, lapse.cancel])
        handler = await continuation(details)
        behavior = handler.unary_unary

        async def run(request: object, context: grpc.aio.ServicerContext) -> object:
            lapse.cancel()
            token = inflight_var.set(reservation if reservation.size else None)
            try:
                return await behavior(request, context)
            finally:
                inflight_var.reset(token)
                reservation.release()

        return grpc.unary_unary_rpc_method_handler(
            run,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


async def _sweep_spool(spool: Spool, seconds: float) -> None:
    while True:
        await asyncio.sleep(seconds)
        try:
            await asyncio.to_thread(spool.sweep)
        except OSError as exc:
            log.warning("spool sweep failed: %s", exc)


async def _monitor_dependencies(running: RunningServer, pool: TranscriberPool) -> None:
    while True:
        changed = pool.changed()
        TRANSCRIBERS.labels("serving").set(pool.serving_count)
        TRANSCRIBERS.labels("not_serving").set(len(pool.endpoints) - pool.serving_count)
        await running.health.set(DEP_TRANSCRIBERS, SERVING if pool.serving_count else NOT_SERVING)
        await changed
