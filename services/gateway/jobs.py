"""The Jobs API as the gateway's doors use it (gRPC servicer and HTTP front door).

Uploads are received, bounded and validated here: no job and no blob exists until the whole
request has passed its checks (config first, then size while receiving, then format and duration
while decoding). Then the jobstore stores it. Protobuf in and out, no grpc.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable

from services.gateway import audio as audio_mod
from services.gateway.auth import Caller, current_caller, require_write
from services.gateway.config import GatewaySettings
from services.gateway.jobstore_client import JobstoreClient
from services.gateway.quotas import QUOTA_USED, Quotas, TenantQuota
from services.gateway.requests import ModelCaps, ValidConfig, validate_config
from services.shared import formats
from services.shared.context import audit
from services.shared.domain import MAX_REQUEST_ID_CHARS
from services.shared.errors import InvalidInput, LimitExceeded, ServiceError, Unavailable, WrongState
from services.shared.internal.v1 import jobstore_pb2
from services.shared.metrics import bounded_tenant
from services.shared.spool import Spool
from stt.v1 import common_pb2, jobs_pb2

PIECE = 256 * 1024
FORMATS = {
    common_pb2.TRANSCRIPT_FORMAT_UNSPECIFIED: "text",
    common_pb2.TRANSCRIPT_FORMAT_TEXT: "text",
    common_pb2.TRANSCRIPT_FORMAT_JSON: "json",
    common_pb2.TRANSCRIPT_FORMAT_SRT: "srt",
    common_pb2.TRANSCRIPT_FORMAT_VTT: "vtt",
}
# Errors of the audio and config checks name fields as Recognize does; CreateJob's are these.
UPLOAD_FIELDS = {"content": "audio_chunk", "config.": "metadata.config."}


def job_id_of(value: str) -> str:
    if not value:
        raise InvalidInput("job_id is required", reason="MISSING_FIELD", field="job_id")
    if len(value) > 64:
        raise InvalidInput("job_id is too long", reason="BAD_FIELD_VALUE", field="job_id")
    return value


def status_filter(value: int) -> int:
    if value not in jobs_pb2.JobStatus.values():
        raise InvalidInput(
            f"unknown status {value}; use a JobStatus value (JOB_STATUS_UNSPECIFIED: any)",
            reason="BAD_FIELD_VALUE",
            field="status",
        )
    return value


def _visible(event: jobs_pb2.JobEvent) -> bytes:
    """What a watcher can tell apart: everything but the update time."""
    copy = jobs_pb2.JobEvent()
    copy.CopyFrom(event)
    copy.job.ClearField("update_time")
    return copy.SerializeToString(deterministic=True)


class JobsAPI:
    def __init__(
        self,
        settings: GatewaySettings,
        jobstore: JobstoreClient,
        decode_slots: asyncio.Semaphore,
        caps: Callable[[], ModelCaps | None] = lambda: None,
        quotas: Quotas | None = None,
        spool: Spool | None = None,
    ) -> None:
        self.settings = settings
        self.quotas = quotas or Quotas(TenantQuota())
        self.jobstore = jobstore
        self.decode_slots = decode_slots
        self.caps = caps
        # Uploads are spooled here while they are checked (removed when the call ends; what a crash
        # left is removed at the next start).
        self.spool = spool or Spool(settings.spool_root(), name="uploads")
        self.limits = audio_mod.Limits(settings.max_job_bytes, settings.max_job_seconds)
        self.draining = asyncio.Event()

    def admit(self, *, write: bool = False) -> Caller:
        """Every call: the caller's request rate; writes also refuse read-only keys."""
        caller = current_caller()
        if write:
            require_write(caller)
        self.quotas.admit(caller)
        return caller

    async def usage(self, tenant: str) -> jobstore_pb2.TenantUsage:
        used = await self.jobstore.call("GetTenantUsage", jobstore_pb2.TenantUsageRequest(tenant=tenant))
        QUOTA_USED.labels(bounded_tenant(tenant), "queued_jobs").set(used.queued_jobs)
        QUOTA_USED.labels(bounded_tenant(tenant), "stored_audio_bytes").set(used.stored_audio_bytes)
        return used

    async def drain(self) -> None:
        """Shutdown: end WatchJob streams now with UNAVAILABLE (clients reconnect to another gateway)
        instead of holding the drain open until they are cut."""
        self.draining.set()

    # -- CreateJob ---------------------------------------------------------------------------------

    def check_metadata(self, meta: jobs_pb2.JobMetadata) -> ValidConfig:
        """Everything about the upload that can be checked before its audio is read."""
        if len(meta.request_id) > MAX_REQUEST_ID_CHARS:
            raise InvalidInput(
                f"request_id is longer than {MAX_REQUEST_ID_CHARS} characters",
                reason="BAD_FIELD_VALUE",
                field="metadata.request_id",
            )
        if meta.priority not in jobs_pb2.Priority.values():
            raise InvalidInput(
                f"unknown priority {meta.priority}", reason="BAD_FIELD_VALUE", field="metadata.priority"
            )
        if meta.size_bytes < 0:
            raise InvalidInput(
                "size_bytes must not be negative", reason="BAD_FIELD_VALUE", field="metadata.size_bytes"
            )
        if meta.size_bytes > self.limits.max_bytes:
            raise LimitExceeded(
                f"declared size {meta.size_bytes} bytes is over the {self.limits.max_bytes} byte limit",
                reason="AUDIO_TOO_LARGE",
                field="metadata.size_bytes",
                metadata={"limit_bytes": str(self.limits.max_bytes)},
            )
        return validate_config(meta.config, prefix="metadata.config.", caps=self.caps())

    async def create_job(
        self, tenant: str, meta: jobs_pb2.JobMetadata, chunks: AsyncIterator[bytes]
    ) -> jobs_pb2.Job:
        """Validate, receive, check and store an upload; a known request_id returns its job.
        Quotas (priority, queued jobs, stored audio) are checked before the upload is read."""
        caller = self.admit(write=True)
        cfg = self.check_metadata(meta)
        self.quotas.check_priority(caller, meta.priority or jobs_pb2.PRIORITY_NORMAL)
        if meta.request_id:
            existing = await self.jobstore.call(
                "GetJob", jobstore_pb2.StoreGetJobRequest(tenant=tenant, request_id=meta.request_id)
            )
            if existing.HasField("job"):
                return existing.job  # a retried upload: the job the first attempt created
        used = await self.usage(tenant)
        self.quotas.check_jobs(caller, used.queued_jobs, used.stored_audio_bytes)
        fd, path = await asyncio.to_thread(self.spool.mkstemp, "upload-")
        try:
            size = 0
            with os.fdopen(fd, "wb") as fh:
                async for piece in chunks:
                    size += len(piece)
                    audit().audio_bytes += len(piece)
                    if size > self.limits.max_bytes:
                        raise LimitExceeded(
                            f"upload is over the {self.limits.max_bytes} byte limit",
                            reason="AUDIO_TOO_LARGE",
                            field="audio_chunk",
                            metadata={"limit_bytes": str(self.limits.max_bytes)},
                        )
                    await asyncio.to_thread(fh.write, piece)
            try:
                async with self.decode_slots:
                    # A cheap check (format, codec, declared length, the first seconds, not cut
                    # short): the job decodes the audio once, enforcing the limits as it goes.
                    info = await asyncio.to_thread(
                        audio_mod.probe,
                        path,
                        limits=self.limits,
                        encoding=cfg.encoding,
                        sample_rate=cfg.sample_rate,
                        channels=cfg.channels,
                    )
            except ServiceError as exc:
                raise exc.relocated(UPLOAD_FIELDS) from None
            return await self._store(tenant, meta, path, info.seconds)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    async def _store(
        self, tenant: str, meta: jobs_pb2.JobMetadata, path: str, seconds: float
    ) -> jobs_pb2.Job:
        quota = self.quotas.of(tenant)

        async def requests() -> AsyncIterator[jobstore_pb2.StoreCreateJobRequest]:
            yield jobstore_pb2.StoreCreateJobRequest(
                metadata=jobstore_pb2.StoreJobMetadata(
                    tenant=tenant,
                    request_id=meta.request_id,
                    filename=os.path.basename(meta.filename)[:512],
                    priority=meta.priority or jobs_pb2.PRIORITY_NORMAL,
                    config=meta.config,
                    audio_duration_seconds=round(seconds, 3),
                    max_attempts=self.settings.max_job_attempts,
                    keep_audio=meta.keep_audio,
                    quota=jobstore_pb2.QuotaLimits(
                        max_queued_jobs=quota.queued_jobs, max_stored_audio_bytes=quota.stored_audio_bytes
                    ),
                )
            )
            fh = await asyncio.to_thread(open, path, "rb")
            try:
                while piece := await asyncio.to_thread(fh.read, PIECE):
                    yield jobstore_pb2.StoreCreateJobRequest(audio_chunk=piece)
            finally:
                fh.close()

        return (await self.jobstore.create_job(requests())).job.job

    # -- the rest ------------------------------------------------------------------------------------

    async def stored(self, tenant: str, job_id: str) -> jobstore_pb2.StoredJob:
        return await self.jobstore.call(
            "GetJob", jobstore_pb2.StoreGetJobRequest(tenant=tenant, job_id=job_id_of(job_id))
        )

    async def get_job(self, tenant: str, job_id: str) -> jobs_pb2.Job:
        self.admit()
        return (await self.stored(tenant, job_id)).job

    async def list_jobs(self, tenant: str, request: jobs_pb2.ListJobsRequest) -> jobs_pb2.ListJobsResponse:
        self.admit()
        if request.page_size < 0:
            raise InvalidInput("page_size must not be negative", reason="BAD_FIELD_VALUE", field="page_size")
        resp = await self.jobstore.call(
            "ListJobs",
            jobstore_pb2.StoreListJobsRequest(
                tenant=tenant,
                status=status_filter(request.status),  # type: ignore[arg-type]
                page_size=request.page_size,
                page_token=request.page_token,
            ),
        )
        return jobs_pb2.ListJobsResponse(
            jobs=[j.job for j in resp.jobs], next_page_token=resp.next_page_token
        )

    async def watch_job(self, tenant: str, job_id: str) -> AsyncIterator[jobs_pb2.JobEvent]:
        """The job now, then each visible change, until it is terminal (or this gateway drains)."""
        self.admit()
        if self.draining.is_set():
            raise Unavailable("this gateway is shutting down; reconnect", reason="DRAINING")
        events = self.jobstore.watch(jobstore_pb2.StoreJobRef(tenant=tenant, job_id=job_id_of(job_id)))
        drained = asyncio.ensure_future(self.draining.wait())
        last = b""
        nxt: asyncio.Future[jobs_pb2.JobEvent] | None = None
        try:
            while True:
                nxt = asyncio.ensure_future(anext(events))
                done, _ = await asyncio.wait({nxt, drained}, return_when=asyncio.FIRST_COMPLETED)
                if nxt not in done:
                    raise Unavailable("this gateway is shutting down; reconnect", reason="DRAINING")
                try:
                    event = nxt.result()
                except StopAsyncIteration:
                    return
                seen = _visible(event)
                if seen != last:
                    last = seen
                    yield event
        finally:
            drained.cancel()
            if nxt is not None and not nxt.done():
                # The caller went away (or the gateway drains) while the next event was awaited: that
                # read must end before the stream can be closed ("aclose(): asynchronous generator is
                # already running" turned a client closing its watch into INTERNAL).
                nxt.cancel()
                await asyncio.gather(nxt, return_exceptions=True)
            await events.aclose()

    async def cancel_job(self, tenant: str, job_id: str) -> jobs_pb2.Job:
        self.admit(write=True)
        ref = jobstore_pb2.StoreJobRef(tenant=tenant, job_id=job_id_of(job_id))
        return (await self.jobstore.call("CancelJob", ref)).job

    async def delete_job(self, tenant: str, job_id: str) -> None:
        self.admit(write=True)
        await self.jobstore.call(
            "DeleteJob", jobstore_pb2.StoreJobRef(tenant=tenant, job_id=job_id_of(job_id))
        )

    async def retry_job(self, tenant: str, job_id: str) -> jobs_pb2.Job:
        caller = self.admit(write=True)
        used = await self.usage(tenant)
        self.quotas.check_jobs(caller, used.queued_jobs, 0)
        ref = jobstore_pb2.StoreJobRef(tenant=tenant, job_id=job_id_of(job_id))
        return (await self.jobstore.call("RetryJob", ref)).job

    async def transcript(self, tenant: str, job_id: str, fmt_value: int) -> jobs_pb2.Transcript:
        self.admit()
        fmt = FORMATS.get(fmt_value)  # type: ignore[call-overload]
        if fmt is None:
            raise InvalidInput(
                f"unknown transcript format {fmt_value}", reason="BAD_FIELD_VALUE", field="format"
            )
        job = (await self.stored(tenant, job_id)).job
        if job.status != jobs_pb2.JOB_STATUS_COMPLETED:
            status = jobs_pb2.JobStatus.Name(job.status).removeprefix("JOB_STATUS_")
            raise WrongState(
                f"job {job.job_id} is {status}; its transcript is available once it is COMPLETED",
                reason="JOB_NOT_COMPLETED",
            )
        chunks = await self.jobstore.call(
            "GetChunks", jobstore_pb2.StoreJobRef(tenant=tenant, job_id=job.job_id)
        )
        segments = [s for c in chunks.chunks for s in c.segments]
        dicts = formats.segments_of(segments)
        content = formats.render(
            dicts,
            fmt,
            language=job.language_code,
            duration=job.audio_duration_seconds,
            extra={"job_id": job.job_id},
        )
        return jobs_pb2.Transcript(
            job_id=job.job_id,
            format=fmt_value or common_pb2.TRANSCRIPT_FORMAT_TEXT,  # type: ignore[arg-type]
            content=content,
            text=formats.plain_text(dicts),
            segments=segments,
            language_code=job.language_code,
            audio_duration_seconds=job.audio_duration_seconds,
        )

    async def queue_stats(self, tenant: str) -> jobs_pb2.QueueStats:
        """The queue per priority, and the calling tenant's quotas with their use."""
        self.admit()
        stats = await self.jobstore.queue_stats()
        used = await self.usage(tenant)
        stats.quotas.extend(
            self.quotas.usage(tenant, queued=used.queued_jobs, stored=used.stored_audio_bytes)
        )
        return stats

    async def store_info(self) -> jobstore_pb2.StoreInfo:
        return await self.jobstore.call("GetStoreInfo", jobstore_pb2.GetStoreInfoRequest())
