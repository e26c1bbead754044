"""stt.v1.Jobs: the public jobs API. Uploads are received, bounded and validated here (no job and
no blob exists until the audio has decoded within the limits), then stored by the jobstore."""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections.abc import AsyncIterator

import grpc
from google.protobuf import empty_pb2

from services.gateway import audio as audio_mod
from services.gateway.auth import current_tenant
from services.gateway.config import GatewaySettings
from services.gateway.jobstore_client import JobstoreClient
from services.gateway.requests import encoding_name, validate_language
from services.shared.errors import InvalidInput, LimitExceeded, Unavailable, WrongState
from services.shared.status import error_from_rpc
from stt import formats
from stt.client import segments_of
from stt.v1 import common_pb2, jobs_pb2, jobs_pb2_grpc, jobstore_pb2

PIECE = 256 * 1024
_FORMATS = {
    common_pb2.TRANSCRIPT_FORMAT_UNSPECIFIED: "text",
    common_pb2.TEXT: "text",
    common_pb2.JSON: "json",
    common_pb2.SRT: "srt",
    common_pb2.VTT: "vtt",
}


def _job_id(value: str) -> str:
    if not value:
        raise InvalidInput("job_id is required", reason="MISSING_JOB_ID", field="job_id")
    if len(value) > 64:
        raise InvalidInput("job_id is too long", field="job_id")
    return value


class JobsServicer(jobs_pb2_grpc.JobsServicer):
    def __init__(
        self, settings: GatewaySettings, jobstore: JobstoreClient, decode_slots: asyncio.Semaphore
    ) -> None:
        self.settings = settings
        self.jobstore = jobstore
        self.decode_slots = decode_slots
        self.limits = audio_mod.Limits(settings.max_job_bytes, settings.max_job_seconds)
        self.draining = asyncio.Event()

    async def drain(self) -> None:
        """Shutdown: end WatchJob streams now with UNAVAILABLE (clients reconnect to another gateway)
        instead of holding the drain open until they are cut."""
        self.draining.set()

    async def CreateJob(
        self, request_iterator: AsyncIterator[jobs_pb2.CreateJobRequest], context: grpc.aio.ServicerContext
    ) -> jobs_pb2.Job:
        tenant = current_tenant()
        first = await anext(aiter(request_iterator), None)
        if first is None or not first.HasField("metadata"):
            raise InvalidInput(
                "the first CreateJob message must carry metadata (request_id, filename, priority, config)",
                reason="MISSING_METADATA",
                field="metadata",
            )
        meta = first.metadata
        if len(meta.request_id) > 128:
            raise InvalidInput("request_id is longer than 128 characters", field="metadata.request_id")
        if meta.priority not in jobs_pb2.Priority.values():
            raise InvalidInput(f"unknown priority {meta.priority}", field="metadata.priority")
        if meta.size_bytes > self.limits.max_bytes:
            raise LimitExceeded(
                f"declared size {meta.size_bytes} bytes is over the {self.limits.max_bytes} byte limit",
                reason="AUDIO_TOO_LARGE",
                field="metadata.size_bytes",
            )
        validate_language(meta.config.language_code, "metadata.config.language_code")
        if meta.config.encoding == common_pb2.LINEAR16:
            audio_mod.validate_linear16(meta.config.sample_rate_hz, meta.config.audio_channel_count or 1)
        if meta.request_id:
            existing = await self.jobstore.call(
                "GetJob", jobstore_pb2.StoreGetJobRequest(tenant=tenant, request_id=meta.request_id)
            )
            if existing.HasField("job"):
                return existing.job  # a retried upload: the job the first attempt created
        fd, path = tempfile.mkstemp(prefix="stt-upload-", dir=self.settings.spool_dir)
        try:
            size = 0
            with os.fdopen(fd, "wb") as fh:
                async for msg in request_iterator:
                    if msg.HasField("metadata"):
                        raise InvalidInput("metadata may only be sent in the first message", field="metadata")
                    size += len(msg.audio_chunk)
                    if size > self.limits.max_bytes:
                        raise LimitExceeded(
                            f"upload is over the {self.limits.max_bytes} byte limit",
                            reason="AUDIO_TOO_LARGE",
                            field="audio_chunk",
                        )
                    await asyncio.to_thread(fh.write, msg.audio_chunk)
            async with self.decode_slots:
                info = await asyncio.to_thread(
                    audio_mod.decode_to_file,
                    path,
                    None,
                    limits=self.limits,
                    encoding=encoding_name(meta.config),
                    sample_rate=meta.config.sample_rate_hz,
                    channels=meta.config.audio_channel_count,
                )
            return await self._store(tenant, meta, path, info.seconds)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    async def _store(
        self, tenant: str, meta: jobs_pb2.JobMetadata, path: str, seconds: float
    ) -> jobs_pb2.Job:
        async def requests() -> AsyncIterator[jobstore_pb2.StoreCreateJobRequest]:
            yield jobstore_pb2.StoreCreateJobRequest(
                metadata=jobstore_pb2.StoreJobMetadata(
                    tenant=tenant,
                    request_id=meta.request_id,
                    filename=os.path.basename(meta.filename)[:512],
                    priority=meta.priority or jobs_pb2.NORMAL,
                    config=meta.config,
                    audio_duration_seconds=round(seconds, 3),
                    max_attempts=self.settings.max_job_attempts,
                )
            )
            fh = await asyncio.to_thread(open, path, "rb")
            try:
                while piece := await asyncio.to_thread(fh.read, PIECE):
                    yield jobstore_pb2.StoreCreateJobRequest(audio_chunk=piece)
            finally:
                fh.close()

        return (await self.jobstore.create_job(requests())).job.job

    async def GetJob(
        self, request: jobs_pb2.GetJobRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.Job:
        return (await self._get(request.job_id)).job

    async def _get(self, job_id: str) -> jobstore_pb2.StoredJob:
        return await self.jobstore.call(
            "GetJob", jobstore_pb2.StoreGetJobRequest(tenant=current_tenant(), job_id=_job_id(job_id))
        )

    async def ListJobs(
        self, request: jobs_pb2.ListJobsRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.ListJobsResponse:
        resp = await self.jobstore.call(
            "ListJobs",
            jobstore_pb2.StoreListJobsRequest(
                tenant=current_tenant(),
                status=request.status,
                page_size=request.page_size,
                page_token=request.page_token,
            ),
        )
        return jobs_pb2.ListJobsResponse(
            jobs=[j.job for j in resp.jobs], next_page_token=resp.next_page_token
        )

    async def WatchJob(
        self, request: jobs_pb2.WatchJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[jobs_pb2.JobEvent]:
        if self.draining.is_set():
            raise Unavailable("this gateway is shutting down; reconnect", reason="DRAINING")
        call = self.jobstore.stream(
            "WatchJob", jobstore_pb2.StoreJobRef(tenant=current_tenant(), job_id=_job_id(request.job_id))
        )
        drained = asyncio.ensure_future(self.draining.wait())
        try:
            events = aiter(call)
            while True:
                nxt = asyncio.ensure_future(anext(events))
                done, _ = await asyncio.wait({nxt, drained}, return_when=asyncio.FIRST_COMPLETED)
                if nxt not in done:
                    nxt.cancel()
                    raise Unavailable("this gateway is shutting down; reconnect", reason="DRAINING")
                try:
                    event = nxt.result()
                except StopAsyncIteration:
                    return
                yield event
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from None
        finally:
            drained.cancel()
            call.cancel()

    async def CancelJob(
        self, request: jobs_pb2.CancelJobRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.Job:
        resp = await self.jobstore.call(
            "CancelJob", jobstore_pb2.StoreJobRef(tenant=current_tenant(), job_id=_job_id(request.job_id))
        )
        return resp.job

    async def DeleteJob(
        self, request: jobs_pb2.DeleteJobRequest, context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        await self.jobstore.call(
            "DeleteJob", jobstore_pb2.StoreJobRef(tenant=current_tenant(), job_id=_job_id(request.job_id))
        )
        return empty_pb2.Empty()

    async def GetTranscript(
        self, request: jobs_pb2.GetTranscriptRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.Transcript:
        fmt = _FORMATS.get(request.format)
        if fmt is None:
            raise InvalidInput(f"unknown transcript format {request.format}", field="format")
        stored = await self._get(request.job_id)
        job = stored.job
        if job.status != jobs_pb2.COMPLETED:
            raise WrongState(
                f"job {job.job_id} is {jobs_pb2.JobStatus.Name(job.status)}; its transcript is available "
                "once it is COMPLETED",
                reason="JOB_NOT_COMPLETED",
            )
        chunks = await self.jobstore.call("GetChunks", jobstore_pb2.StoreJobRef(job_id=job.job_id))
        segments = [s for c in chunks.chunks for s in c.segments]
        dicts = segments_of(segments)
        content = formats.render(
            dicts,
            fmt,
            language=job.language_code,
            duration=job.audio_duration_seconds,
            extra={"job_id": job.job_id},
        )
        return jobs_pb2.Transcript(
            job_id=job.job_id,
            format=request.format or common_pb2.TEXT,
            content=content,
            text=formats.plain_text(dicts),
            segments=segments,
            language_code=job.language_code,
            audio_duration_seconds=job.audio_duration_seconds,
        )

    async def GetQueueStats(
        self, request: jobs_pb2.GetQueueStatsRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.QueueStats:
        return await self.jobstore.queue_stats()
