"""stt.v1.Jobs over gRPC: a thin mapping onto services.gateway.jobs.JobsAPI."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from google.protobuf import empty_pb2

from services.gateway.auth import current_tenant
from services.gateway.jobs import JobsAPI
from services.shared.errors import InvalidInput
from stt.v1 import jobs_pb2, jobs_pb2_grpc


async def _audio(requests: AsyncIterator[jobs_pb2.CreateJobRequest]) -> AsyncIterator[bytes]:
    async for msg in requests:
        if msg.HasField("metadata"):
            raise InvalidInput(
                "metadata may only be sent in the first message", reason="MISSING_METADATA", field="metadata"
            )
        yield msg.audio_chunk


class JobsServicer(jobs_pb2_grpc.JobsServicer):
    def __init__(self, api: JobsAPI) -> None:
        self.api = api

    async def CreateJob(
        self, request_iterator: AsyncIterator[jobs_pb2.CreateJobRequest], context: grpc.aio.ServicerContext
    ) -> jobs_pb2.Job:
        first = await anext(aiter(request_iterator), None)
        if first is None or not first.HasField("metadata"):
            raise InvalidInput(
                "the first CreateJob message must carry metadata (request_id, filename, priority, config)",
                reason="MISSING_METADATA",
                field="metadata",
            )
        return await self.api.create_job(current_tenant(), first.metadata, _audio(request_iterator))

    async def GetJob(
        self, request: jobs_pb2.GetJobRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.Job:
        return await self.api.get_job(current_tenant(), request.job_id)

    async def ListJobs(
        self, request: jobs_pb2.ListJobsRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.ListJobsResponse:
        return await self.api.list_jobs(current_tenant(), request)

    async def WatchJob(
        self, request: jobs_pb2.WatchJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[jobs_pb2.JobEvent]:
        async for event in self.api.watch_job(current_tenant(), request.job_id):
            yield event

    async def CancelJob(
        self, request: jobs_pb2.CancelJobRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.Job:
        return await self.api.cancel_job(current_tenant(), request.job_id)

    async def DeleteJob(
        self, request: jobs_pb2.DeleteJobRequest, context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        await self.api.delete_job(current_tenant(), request.job_id)
        return empty_pb2.Empty()

    async def RetryJob(
        self, request: jobs_pb2.RetryJobRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.Job:
        return await self.api.retry_job(current_tenant(), request.job_id)

    async def GetTranscript(
        self, request: jobs_pb2.GetTranscriptRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.Transcript:
        return await self.api.transcript(current_tenant(), request.job_id, request.format)

    async def GetQueueStats(
        self, request: jobs_pb2.GetQueueStatsRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.QueueStats:
        return await self.api.queue_stats(current_tenant())
