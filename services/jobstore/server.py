"""Builds the jobstore: database (migrated), blob store, event bus, Store, gRPC server, and the
background reaper (expired leases) and sweeper (expired results)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from services.jobstore import db, metrics, migrate
from services.jobstore.blobs import FileBlobStore
from services.jobstore.config import JobstoreSettings
from services.jobstore.crypto import Sealer
from services.jobstore.events import EventBus
from services.jobstore.servicer import JobStoreServicer
from services.jobstore.store import Store
from services.shared.errors import ServiceError, Unavailable
from services.shared.internal.v1 import jobstore_pb2, jobstore_pb2_grpc
from services.shared.security import InternalAuthInterceptor, check_exposure, internal_auth
from services.shared.server import RunningServer, Service, start_server

log = logging.getLogger("jobstore")

SERVICE_NAME = jobstore_pb2.DESCRIPTOR.services_by_name["JobStore"].full_name


@dataclass
class JobstoreApp:
    running: RunningServer
    store: Store

    @property
    def port(self) -> int:
        return self.running.port

    async def stop(self, grace: float | None = None) -> None:
        await self.running.stop(grace)


async def build_store(settings: JobstoreSettings) -> tuple[Store, Callable[[], Awaitable[None]]]:
    """The Store with its engine and bus; returns it with a close function."""
    sealer = Sealer.from_settings(
        settings.encryption_key.get_secret_value() if settings.encryption_key else None,
        settings.encryption_old_keys.get_secret_value() if settings.encryption_old_keys else None,
    )
    engine = db.create_engine(settings.db_url(), pool_size=settings.db_pool_size)
    if settings.db_migrate:
        await migrate.upgrade(engine)
    bus = EventBus(settings.redis_url, settings.redis_prefix)
    await bus.start()
    blobs = FileBlobStore(settings.blob_dir())
    store = Store(
        db.sessionmaker(engine),
        blobs,
        bus,
        lease_seconds=settings.lease_seconds,
        max_attempts=settings.max_attempts,
        result_ttl=settings.result_ttl_seconds,
        failed_ttl=settings.failed_ttl_seconds,
        reconcile_seconds=settings.reconcile_seconds,
        max_blob_bytes=settings.max_blob_bytes or None,
        sealer=sealer,
        stalls_before_charge=settings.stalls_before_charge,
        max_backoff_seconds=settings.max_interruption_backoff_seconds,
    )

    async def close() -> None:
        await bus.close()
        await engine.dispose()
        blobs.close()

    return store, close


def database_errors(exc: BaseException) -> ServiceError | None:
    """A lost or refused database connection is retryable: UNAVAILABLE, not INTERNAL."""
    from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    transient = isinstance(
        exc, OperationalError | InterfaceError | PoolTimeout | ConnectionError | OSError
    ) or (isinstance(exc, DBAPIError) and exc.connection_invalidated)
    if transient:
        return Unavailable(f"the database is unavailable: {type(exc).__name__}", reason="STORE_UNAVAILABLE")
    return None


async def _every(seconds: float, fn: Callable[[], Awaitable[object]], name: str) -> None:
    while True:
        await asyncio.sleep(seconds)
        try:
            await fn()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # database briefly unavailable: try again next round
            log.warning("%s failed: %s", name, exc)


async def create_server(
    settings: JobstoreSettings, *, port: int | None = None, host: str | None = None
) -> JobstoreApp:
    host = host if host is not None else settings.host
    auth = internal_auth(settings)
    anonymous = check_exposure(
        "jobstore", host, authenticated=auth.enabled, allow_anonymous=settings.allow_anonymous
    )
    store, close_store = await build_store(settings)
    if settings.requeue_running_on_start:
        requeued = await store.reap_expired(all_running=True)
        if requeued:
            log.info("requeued %d jobs left running by the previous run", len(requeued))
    servicer = JobStoreServicer(store)
    running = await start_server(
        [Service(SERVICE_NAME, lambda s: jobstore_pb2_grpc.add_JobStoreServicer_to_server(servicer, s))],
        settings=settings,
        host=host,
        port=settings.jobstore_port if port is None else port,
        max_message_bytes=16 * 1024 * 1024,
        error_mapper=database_errors,
        interceptors=[InternalAuthInterceptor(auth)],
        anonymous=anonymous,
    )
    tasks = [
        asyncio.create_task(
            _every(settings.reap_interval_seconds, lambda: metrics.reap(store), "reaper"), name="reaper"
        ),
        asyncio.create_task(_every(settings.sweep_interval_seconds, store.sweep, "sweeper"), name="sweeper"),
        asyncio.create_task(_every(5.0, lambda: metrics.export(store), "metrics"), name="queue-metrics"),
    ]

    async def stop_tasks() -> None:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t

    running.on_stop(close_store)
    running.on_stop(stop_tasks)
    return JobstoreApp(running, store)
