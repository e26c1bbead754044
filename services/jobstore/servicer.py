"""stt.internal.v1.JobStore servicer: requests -> Store calls -> messages. No logic of its own."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from google.protobuf import empty_pb2

from services.jobstore import convert, metrics
from services.jobstore.convert import STATUS_NAMES, chunk_to_proto, stored_job, ts
from services.jobstore.models import Job
from services.jobstore.store import Lease, NewJob, Span, Store
from services.shared import tracing
from services.shared.convert import segment_from_proto
from services.shared.errors import InvalidInput
from services.shared.internal.v1 import jobstore_pb2, jobstore_pb2_grpc
from stt.v1 import jobs_pb2


def _lease(msg: jobstore_pb2.LeaseRequest) -> Lease:
    if not msg.job_id or not msg.worker_id:
        raise InvalidInput("lease needs job_id and worker_id", reason="MISSING_FIELD", field="lease")
    return Lease(msg.job_id, msg.worker_id, msg.lease_epoch, msg.lease_seconds)


def _tenant(request: jobstore_pb2.StoreJobRef | jobstore_pb2.StoreGetJobRequest) -> str | None:
    """The tenant a call acts for. Never "any tenant" by omission: an empty tenant is refused;
    only a call that says all_tenants (the dispatcher, on a job it holds) reaches every tenant."""
    if request.all_tenants:
        return None
    return _required_tenant(request.tenant)


def _required_tenant(tenant: str) -> str:
    if not tenant:
        raise InvalidInput(
            "tenant is required (all_tenants is for the dispatcher only)",
            reason="MISSING_FIELD",
            field="tenant",
        )
    return tenant


class JobStoreServicer(jobstore_pb2_grpc.JobStoreServicer):
    async def GetStoreInfo(
        self, request: jobstore_pb2.GetStoreInfoRequest, context: grpc.aio.ServicerContext
    ) -> jobstore_pb2.StoreInfo:
        return jobstore_pb2.StoreInfo(
            result_ttl_seconds=self.store.result_ttl,
            failed_ttl_seconds=self.store.failed_ttl,
            max_attempts=self.store.max_attempts,
        )

    def __init__(self, store: Store) -> None:
        self.store = store

    async def GetTenantUsage(
        self, request: jobstore_pb2.TenantUsageRequest, context: grpc.aio.ServicerContext
    ) -> jobstore_pb2.TenantUsage:
        usage = await self.store.tenant_usage(_required_tenant(request.tenant))
        return jobstore_pb2.TenantUsage(
            queued_jobs=usage.queued_jobs, stored_audio_bytes=usage.stored_audio_bytes
        )

    async def _out(self, job: Job, *, with_transcript: bool = False) -> jobstore_pb2.StoredJob:
        """The job as callers see it, with whether its audio is still stored."""
        retained = job.id in await self.store.audio_retained([job])
        return stored_job(job, with_transcript=with_transcript, audio_retained=retained)

    async def CreateJob(
        self,
        request_iterator: AsyncIterator[jobstore_pb2.StoreCreateJobRequest],
        context: grpc.aio.ServicerContext,
    ) -> jobstore_pb2.StoreCreateJobResponse:
        first = await anext(aiter(request_iterator), None)
        if first is None or not first.HasField("metadata"):
            raise InvalidInput(
                "the first CreateJob message must carry metadata", reason="MISSING_METADATA", field="metadata"
            )
        meta = first.metadata

        async def pieces() -> AsyncIterator[bytes]:
            async for msg in request_iterator:
                if msg.HasField("metadata"):
                    raise InvalidInput(
                        "metadata may only be sent once, first", reason="MISSING_METADATA", field="metadata"
                    )
                yield msg.audio_chunk

        new = NewJob(
            tenant=_required_tenant(meta.tenant),
            request_id=meta.request_id or None,
            filename=meta.filename,
            priority=meta.priority or jobs_pb2.PRIORITY_NORMAL,
            language=meta.config.language_code or None,
            config=convert.config_to_json(meta.config),
            audio_duration=meta.audio_duration_seconds,
            max_attempts=meta.max_attempts,
            keep_audio=meta.keep_audio,
            max_queued_jobs=meta.quota.max_queued_jobs,
            max_stored_audio_bytes=meta.quota.max_stored_audio_bytes,
            trace_parent=tracing.traceparent(),  # this call's trace: the job's spans continue it
        )
        job, created = await self.store.create_job(new, pieces())
        tracing.set_attributes({"stt.job_id": job.id, "stt.created": created})
        return jobstore_pb2.StoreCreateJobResponse(job=await self._out(job), created=created)

    async def GetJob(
        self, request: jobstore_pb2.StoreGetJobRequest, context: grpc.aio.ServicerContext
    ) -> jobstore_pb2.StoredJob:
        if request.request_id and not request.job_id:
            job = await self.store.find_by_request_id(_required_tenant(request.tenant), request.request_id)
            if job is None:
                return jobstore_pb2.StoredJob()
            return await self._out(job)
        job = await self.store.get_job(request.job_id, _tenant(request))
        return await self._out(job, with_transcript=True)

    async def ListJobs(
        self, request: jobstore_pb2.StoreListJobsRequest, context: grpc.aio.ServicerContext
    ) -> jobstore_pb2.StoreListJobsResponse:
        jobs, token = await self.store.list_jobs(
            _required_tenant(request.tenant),
            status=STATUS_NAMES.get(request.status),
            page_size=request.page_size,
            page_token=request.page_token,
        )
        retained = await self.store.audio_retained(jobs)
        return jobstore_pb2.StoreListJobsResponse(
            jobs=[stored_job(j, audio_retained=j.id in retained) for j in jobs], next_page_token=token
        )

    async def CancelJob(
        self, request: jobstore_pb2.StoreJobRef, context: grpc.aio.ServicerContext
    ) -> jobstore_pb2.StoredJob:
        return await self._out(await self.store.cancel(request.job_id, _tenant(request)))

    async def RetryJob(
        self, request: jobstore_pb2.StoreJobRef, context: grpc.aio.ServicerContext
    ) -> jobstore_pb2.StoredJob:
        return await self._out(await self.store.retry(request.job_id, _tenant(request)))

    async def DeleteJob(
        self, request: jobstore_pb2.StoreJobRef, context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        await self.store.delete(request.job_id, _tenant(request))
        return empty_pb2.Empty()

    async def GetQueueStats(
        self, request: jobs_pb2.GetQueueStatsRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.QueueStats:
        stats = await self.store.queue_stats()
        return jobs_pb2.QueueStats(
            priorities=[
                jobs_pb2.PriorityStats(
                    priority=p.priority,  # type: ignore[arg-type]
                    pending=p.pending,
                    running=p.running,
                    oldest_wait_seconds=round(p.oldest_wait, 3),
                    workers=p.workers,
                )
                for p in stats.priorities
            ],
            workers=stats.workers,
        )

    async def WatchJob(
        self, request: jobstore_pb2.StoreJobRef, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[jobs_pb2.JobEvent]:
        async for job, partial in self.store.watch(request.job_id, _tenant(request)):
            retained = job.id in await self.store.audio_retained([job])
            yield jobs_pb2.JobEvent(
                job=convert.job_to_proto(job, audio_retained=retained), partial_transcript=partial
            )

    async def GetChunks(
        self, request: jobstore_pb2.StoreJobRef, context: grpc.aio.ServicerContext
    ) -> jobstore_pb2.ChunkList:
        chunks = await self.store.chunks(request.job_id, _tenant(request))
        return jobstore_pb2.ChunkList(chunks=[chunk_to_proto(c) for c in chunks])

    async def ReadAudio(
        self, request: jobstore_pb2.StoreJobRef, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[jobstore_pb2.AudioPiece]:
        async for piece in self.store.read_audio(request.job_id, _tenant(request)):
            yield jobstore_pb2.AudioPiece(data=piece)

    async def ClaimJob(
        self, request: jobstore_pb2.ClaimJobRequest, context: grpc.aio.ServicerContext
    ) -> jobstore_pb2.ClaimJobResponse:
        remaining = context.time_remaining()
        limit = 60.0 if remaining is None else max(remaining - 1.0, 0.0)  # answer before the deadline
        wait = min(max(request.wait_seconds, 0.0), limit)
        job = await self.store.claim(request.worker_id, request.lease_seconds, wait)
        return jobstore_pb2.ClaimJobResponse(job=stored_job(job) if job else None)

    async def Heartbeat(
        self, request: jobstore_pb2.LeaseRequest, context: grpc.aio.ServicerContext
    ) -> jobstore_pb2.HeartbeatResponse:
        expires, cancelled = await self.store.heartbeat(_lease(request))
        return jobstore_pb2.HeartbeatResponse(lease_expire_time=ts(expires), cancelled=cancelled)

    async def SetChunkPlan(
        self, request: jobstore_pb2.SetChunkPlanRequest, context: grpc.aio.ServicerContext
    ) -> jobstore_pb2.ChunkList:
        spans = [Span(c.index, c.start_seconds, c.end_seconds) for c in request.chunks]
        chunks = await self.store.set_plan(_lease(request.lease), spans)
        return jobstore_pb2.ChunkList(chunks=[chunk_to_proto(c) for c in chunks])

    async def CompleteChunk(
        self, request: jobstore_pb2.CompleteChunkRequest, context: grpc.aio.ServicerContext
    ) -> jobstore_pb2.ChunkUpdateResponse:
        up = await self.store.complete_chunk(
            _lease(request.lease),
            request.index,
            [segment_from_proto(s) for s in request.segments],
            request.language_code or None,
        )
        return jobstore_pb2.ChunkUpdateResponse(
            chunks_completed=up.chunks_completed, chunks_total=up.chunks_total
        )

    async def FailChunk(
        self, request: jobstore_pb2.FailChunkRequest, context: grpc.aio.ServicerContext
    ) -> jobstore_pb2.ChunkUpdateResponse:
        up = await self.store.fail_chunk(
            _lease(request.lease), request.index, request.error_message, request.reason
        )
        return jobstore_pb2.ChunkUpdateResponse(
            chunks_completed=up.chunks_completed, chunks_total=up.chunks_total, job_failed=up.job_failed,
            attempts=up.attempts,
        )  # fmt: skip

    async def CompleteJob(
        self, request: jobstore_pb2.CompleteJobRequest, context: grpc.aio.ServicerContext
    ) -> jobstore_pb2.StoredJob:
        job = await self.store.complete_job(
            _lease(request.lease), request.transcript, request.language_code or None
        )
        metrics.completed(job)
        return stored_job(job)

    async def FailJob(
        self, request: jobstore_pb2.FailJobRequest, context: grpc.aio.ServicerContext
    ) -> jobstore_pb2.StoredJob:
        return stored_job(
            await self.store.fail_job(_lease(request.lease), request.error_message, request.reason)
        )

    async def ReleaseJob(
        self, request: jobstore_pb2.LeaseRequest, context: grpc.aio.ServicerContext
    ) -> jobstore_pb2.StoredJob:
        return stored_job(await self.store.release(_lease(request)))
