"""gRPC client of the jobstore: the JobQueue for the dispatcher, and plain stubs for the Jobs API.

Downstream failures come back as domain errors (same code, message, reason) via error_from_rpc.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any

import grpc

from services.gateway.jobqueue import ChunkInfo, ClaimedJob, Lease
from services.gateway.requests import decode_options, encoding_name
from services.shared import tracing
from services.shared.channel import InternalCredentials, internal_channel
from services.shared.context import REQUEST_ID_HEADER, request_id_var
from services.shared.convert import segment_from_proto, segment_to_proto
from services.shared.domain import Segment
from services.shared.internal.v1 import jobstore_pb2, jobstore_pb2_grpc
from services.shared.status import error_from_rpc
from stt.v1 import jobs_pb2

SERVICE = "stt.internal.v1.JobStore"


def _lease(lease: Lease) -> jobstore_pb2.LeaseRequest:
    return jobstore_pb2.LeaseRequest(
        job_id=lease.job_id, worker_id=lease.worker_id, lease_epoch=lease.epoch, lease_seconds=lease.seconds
    )


def _chunk(c: jobstore_pb2.Chunk) -> ChunkInfo:
    return ChunkInfo(
        index=c.index,
        start=c.start_seconds,
        end=c.end_seconds,
        completed=c.status == jobstore_pb2.CHUNK_STATUS_COMPLETED,
        segments=[segment_from_proto(s) for s in c.segments],
        language=c.language_code,
    )


class JobstoreClient:
    def __init__(
        self, address: str, *, timeout: float = 30.0, creds: InternalCredentials | None = None
    ) -> None:
        self.address = address
        self.creds = creds or InternalCredentials()
        self.timeout = timeout
        self._old: list[grpc.aio.Channel] = []
        self._connect()

    def _connect(self) -> None:
        # 5 attempts with backoff on UNAVAILABLE (a restarting jobstore or database).
        self.channel = internal_channel(
            self.address, [SERVICE], max_message_bytes=16 * 1024 * 1024, creds=self.creds
        )
        self.stub = jobstore_pb2_grpc.JobStoreStub(self.channel)

    def rotate_if_changed(self) -> bool:
        """New connections with the renewed client certificate once its files change (the old
        channel finishes its calls and is closed with the client)."""
        if self.creds.tls is None or not self.creds.tls.changed():
            return False
        self._old.append(self.channel)
        self._connect()
        return True

    async def close(self) -> None:
        for ch in [*self._old, self.channel]:
            await ch.close()

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return tracing.inject(((REQUEST_ID_HEADER, request_id_var.get() or "-"), *self.creds.metadata))

    async def call(self, method: str, request: Any, *, timeout: float | None = None) -> Any:
        """A unary call with the client's deadline and request id; errors become domain errors."""
        try:
            with tracing.span(f"{SERVICE}/{method}", kind=tracing.CLIENT, child_only=True):
                return await getattr(self.stub, method)(
                    request, timeout=timeout or self.timeout, metadata=self.metadata()
                )
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, unavailable_reason="STORE_UNAVAILABLE") from None

    async def watch(self, ref: jobstore_pb2.StoreJobRef) -> AsyncGenerator[jobs_pb2.JobEvent, None]:
        """WatchJob's events; errors become domain errors. Closing the generator ends the call."""
        call = self.stub.WatchJob(ref, metadata=self.metadata())
        try:
            async for event in call:
                yield event
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, unavailable_reason="STORE_UNAVAILABLE") from None
        finally:
            call.cancel()

    async def create_job(
        self, requests: AsyncIterator[jobstore_pb2.StoreCreateJobRequest]
    ) -> jobstore_pb2.StoreCreateJobResponse:
        try:
            return await self.stub.CreateJob(requests, timeout=600, metadata=self.metadata())
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, unavailable_reason="STORE_UNAVAILABLE") from None

    # -- JobQueue ----------------------------------------------------------------------------------

    async def claim(self, worker_id: str, lease_seconds: float, wait_seconds: float) -> ClaimedJob | None:
        resp = await self.call(
            "ClaimJob",
            jobstore_pb2.ClaimJobRequest(
                worker_id=worker_id, lease_seconds=lease_seconds, wait_seconds=wait_seconds
            ),
            timeout=wait_seconds + self.timeout,
        )
        if not resp.HasField("job"):
            return None
        job = resp.job.job
        options = decode_options(job.config)
        return ClaimedJob(
            job_id=job.job_id,
            epoch=resp.job.lease_epoch,
            options=options,
            encoding=encoding_name(job.config.encoding),
            sample_rate=job.config.sample_rate_hz,
            channels=job.config.audio_channel_count,
            chunks_total=job.chunks_total,
            retry_count=job.retry_count,
            trace_parent=resp.job.trace_parent,
            created_at=job.create_time.ToNanoseconds() / 1e9,
            priority=jobs_pb2.Priority.Name(job.priority).removeprefix("PRIORITY_"),
            interruption_count=job.interruption_count,
        )

    async def heartbeat(self, lease: Lease) -> bool:
        resp = await self.call(
            "Heartbeat", _lease(lease), timeout=min(self.timeout, max(lease.seconds / 3, 1.0))
        )
        return bool(resp.cancelled)

    async def read_audio(self, job_id: str) -> AsyncIterator[bytes]:
        try:
            call = self.stub.ReadAudio(
                jobstore_pb2.StoreJobRef(job_id=job_id, all_tenants=True),
                timeout=600,
                metadata=self.metadata(),
            )
            async for piece in call:
                yield piece.data
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, unavailable_reason="STORE_UNAVAILABLE") from None

    async def set_plan(self, lease: Lease, spans: Sequence[tuple[float, float]]) -> list[ChunkInfo]:
        req = jobstore_pb2.SetChunkPlanRequest(
            lease=_lease(lease),
            chunks=[
                jobstore_pb2.ChunkSpan(index=i, start_seconds=a, end_seconds=b)
                for i, (a, b) in enumerate(spans)
            ],
        )
        return [_chunk(c) for c in (await self.call("SetChunkPlan", req)).chunks]

    async def chunks(self, job_id: str) -> list[ChunkInfo]:
        return [
            _chunk(c)
            for c in (
                await self.call("GetChunks", jobstore_pb2.StoreJobRef(job_id=job_id, all_tenants=True))
            ).chunks
        ]

    async def complete_chunk(self, lease: Lease, index: int, segments: list[Segment], language: str) -> None:
        await self.call(
            "CompleteChunk",
            jobstore_pb2.CompleteChunkRequest(
                lease=_lease(lease),
                index=index,
                segments=[segment_to_proto(s) for s in segments],
                language_code=language,
            ),
        )

    async def fail_chunk(self, lease: Lease, index: int, error: str, reason: str) -> bool:
        resp = await self.call(
            "FailChunk",
            jobstore_pb2.FailChunkRequest(
                lease=_lease(lease), index=index, error_message=error, reason=reason
            ),
        )
        return bool(resp.job_failed)

    async def complete_job(self, lease: Lease, transcript: str, language: str) -> None:
        await self.call(
            "CompleteJob",
            jobstore_pb2.CompleteJobRequest(
                lease=_lease(lease), transcript=transcript, language_code=language
            ),
        )

    async def fail_job(self, lease: Lease, error: str, reason: str) -> None:
        await self.call(
            "FailJob", jobstore_pb2.FailJobRequest(lease=_lease(lease), error_message=error, reason=reason)
        )

    async def release(self, lease: Lease) -> None:
        await self.call("ReleaseJob", _lease(lease))

    async def queue_stats(self) -> jobs_pb2.QueueStats:
        return await self.call("GetQueueStats", jobs_pb2.GetQueueStatsRequest())
