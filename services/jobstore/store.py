"""Job state, the priority queue, leases with fencing, chunk checkpoints. No grpc here.

SQL is the truth. Every write by a job's holder is a conditional UPDATE on (id, lease_epoch,
status=RUNNING) made first in its transaction, so it holds the job row (PostgreSQL) or the write
lock (SQLite) until commit: a holder whose lease expired or was taken over gets `Aborted` and
changes nothing. Claims on PostgreSQL use `FOR UPDATE SKIP LOCKED`; on SQLite the conditional
UPDATE alone makes them exclusive.

Attempts are charged to the cause (see docs/jobs.md):
- a chunk that fails with an error of its own (the dispatcher reports only those: a model error, a
  call that timed out, every replica failing it) charges one attempt (`retry_count + 1`);
- an interruption (a restart, a drain, a worker whose lease expired) is not charged: it counts in
  `interruption_count`, and the job goes back to the queue keeping its finished chunks. Graceful
  releases are always free. Lost workers are free too unless the job keeps losing them without
  progress: each interruption after `stalls_before_charge` in a row with no chunk (or plan)
  recorded in between charges an attempt, and the job waits a growing backoff before its next
  claim, so a job that keeps killing its worker FAILS (reason WORKER_LOST) instead of looping;
- the job FAILS when `retry_count` reaches `max_attempts`, with `failure_reason` set.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import and_, delete, false, func, literal, or_, select, true, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.jobstore.blobs import BlobStore
from services.jobstore.crypto import Sealer
from services.jobstore.events import EventBus, wait
from services.jobstore.models import Chunk, ChunkState, Job, Priority, Status, UTCDateTime
from services.shared.domain import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, Segment, join_text, join_texts
from services.shared.errors import Aborted, InvalidInput, LimitExceeded, NotFound, QuotaExceeded, WrongState

log = logging.getLogger("jobstore")

WORKER_WINDOW_SECONDS = 60.0  # QueueStats.workers: dispatchers seen in this window


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(slots=True)
class NewJob:
    tenant: str
    request_id: str | None
    filename: str
    priority: int
    language: str | None
    config: dict[str, Any]
    audio_duration: float
    max_attempts: int
    keep_audio: bool = False
    # The tenant's quotas (0: no limit), checked against its usage before the job is stored.
    max_queued_jobs: int = 0
    max_stored_audio_bytes: int = 0
    trace_parent: str = ""


@dataclass(slots=True)
class TenantUsage:
    queued_jobs: int = 0  # QUEUED or RUNNING
    stored_audio_bytes: int = 0


@dataclass(slots=True)
class Lease:
    job_id: str
    worker_id: str
    epoch: int
    seconds: float = 0.0


@dataclass(slots=True)
class Span:
    index: int
    start: float
    end: float


@dataclass(slots=True)
class ChunkUpdate:
    chunks_completed: int
    chunks_total: int
    attempts: int = 0
    job_failed: bool = False


@dataclass(slots=True)
class PriorityStat:
    priority: int
    pending: int = 0
    running: int = 0
    oldest_wait: float = 0.0
    workers: int = 0


@dataclass(slots=True)
class QueueStats:
    priorities: list[PriorityStat] = field(default_factory=list)
    workers: int = 0


def chunk_segments(chunk: Chunk) -> list[Segment]:
    if not chunk.segments_json:
        return []
    return [Segment.from_dict(d) for d in json.loads(chunk.segments_json)]


class Store:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        blobs: BlobStore,
        bus: EventBus,
        *,
        lease_seconds: float = 30.0,
        max_attempts: int = 3,
        result_ttl: float = 86_400.0,
        failed_ttl: float = 7 * 86_400.0,
        reconcile_seconds: float = 2.0,
        max_blob_bytes: int | None = None,
        sealer: Sealer | None = None,
        stalls_before_charge: int = 5,
        backoff_seconds: float = 1.0,
        max_backoff_seconds: float = 60.0,
    ) -> None:
        self.sessions = sessions
        self.blobs = blobs
        self.bus = bus
        self.lease_seconds = lease_seconds
        self.max_attempts = max_attempts
        self.result_ttl = result_ttl
        self.failed_ttl = failed_ttl
        self.reconcile_seconds = reconcile_seconds
        self.max_blob_bytes = max_blob_bytes
        self.sealer = sealer or Sealer()
        self.stalls_before_charge = stalls_before_charge
        self.backoff_seconds = backoff_seconds
        self.max_backoff_seconds = max_backoff_seconds
        self._seen_workers: dict[str, float] = {}

    # -- creating and reading ---------------------------------------------------------------------

    async def find_by_request_id(self, tenant: str, request_id: str) -> Job | None:
        async with self.sessions() as s:
            return (
                await s.execute(select(Job).where(Job.tenant == tenant, Job.request_id == request_id))
            ).scalar_one_or_none()

    async def create_job(self, new: NewJob, audio: AsyncIterator[bytes]) -> tuple[Job, bool]:
        """Store the audio, then the row. A repeated (tenant, request_id) returns the first job."""
        if new.request_id:
            existing = await self.find_by_request_id(new.tenant, new.request_id)
            if existing is not None:
                return existing, False
        await self._check_quota(new, 0)
        job_id = uuid.uuid4().hex
        counted = _Counted(audio, self.max_blob_bytes)
        await self.blobs.write(job_id, self.sealer.seal_stream(counted))
        size = counted.size
        if size == 0:
            await self.blobs.delete(job_id)
            raise InvalidInput("the upload carried no audio", reason="EMPTY_AUDIO", field="audio_chunk")
        try:
            await self._check_quota(new, size)
        except QuotaExceeded:
            await self.blobs.delete(job_id)
            raise
        now = utcnow()
        job = Job(
            id=job_id,
            tenant=new.tenant,
            request_id=new.request_id or None,
            status=Status.QUEUED,
            priority=int(new.priority),
            language=new.language,
            config_json=json.dumps(new.config, sort_keys=True),
            filename=new.filename,
            size_bytes=size,
            audio_duration=new.audio_duration,
            blob_key=job_id,
            keep_audio=new.keep_audio,
            audio_retained=True,
            lease_epoch=0,
            retry_count=0,
            max_attempts=new.max_attempts or self.max_attempts,
            chunks_total=0,
            chunks_completed=0,
            created_at=now,
            updated_at=now,
            trace_parent=new.trace_parent or None,
        )
        try:
            async with self.sessions.begin() as s:
                s.add(job)
        except IntegrityError:
            await self.blobs.delete(job_id)
            if new.request_id:
                existing = await self.find_by_request_id(new.tenant, new.request_id)
                if existing is not None:
                    return existing, False
            raise
        log.info("job created", extra={"job_id": job_id, "tenant": new.tenant, "priority": job.priority})
        await self.bus.publish_wake()
        await self.bus.publish_job(job_id)
        return job, True

    async def _check_quota(self, new: NewJob, size: int) -> None:
        """The tenant's queued-jobs and stored-audio quotas, before its upload is stored (size 0:
        the early check, before the audio is read) and again before the job row is written."""
        if not (new.max_queued_jobs or new.max_stored_audio_bytes):
            return
        usage = await self.tenant_usage(new.tenant)
        if new.max_queued_jobs and usage.queued_jobs >= new.max_queued_jobs:
            raise QuotaExceeded(
                f"tenant {new.tenant} has {usage.queued_jobs} jobs queued or running; its quota is "
                f"{new.max_queued_jobs}",
                reason="QUOTA_EXCEEDED",
                subject=f"tenant:{new.tenant}",
                quota="queued_jobs",
                retry_after_seconds=30.0,
                metadata={"quota": "queued_jobs", "limit": str(new.max_queued_jobs)},
            )
        limit = new.max_stored_audio_bytes
        if limit and usage.stored_audio_bytes + size > limit:
            raise QuotaExceeded(
                f"tenant {new.tenant} stores {usage.stored_audio_bytes} bytes of audio; with this upload "
                f"({size} bytes) it would pass its quota of {limit} bytes",
                reason="QUOTA_EXCEEDED",
                subject=f"tenant:{new.tenant}",
                quota="stored_audio_bytes",
                retry_after_seconds=60.0,
                metadata={"quota": "stored_audio_bytes", "limit": str(limit)},
            )

    async def tenant_usage(self, tenant: str) -> TenantUsage:
        async with self.sessions() as s:
            queued = (
                await s.execute(
                    select(func.count()).where(
                        Job.tenant == tenant, Job.status.in_([Status.QUEUED, Status.RUNNING])
                    )
                )
            ).scalar_one()
            stored = (
                await s.execute(
                    select(func.coalesce(func.sum(Job.size_bytes), 0)).where(
                        Job.tenant == tenant, Job.audio_retained == true()
                    )
                )
            ).scalar_one()
        return TenantUsage(int(queued), int(stored))

    async def get_job(self, job_id: str, tenant: str | None = None) -> Job:
        """The job (tenant None: whatever its tenant — internal callers only). Its transcript is
        decrypted."""
        async with self.sessions() as s:
            job = await s.get(Job, job_id)
        if job is None or (tenant is not None and job.tenant != tenant):
            raise NotFound(f"job {job_id!r} not found", reason="JOB_NOT_FOUND", field="job_id")
        job.transcript = self.sealer.open_text(job.transcript)
        return job

    async def list_jobs(
        self, tenant: str, *, status: str | None = None, page_size: int = 0, page_token: str = ""
    ) -> tuple[list[Job], str]:
        if page_size < 0:
            raise InvalidInput("page_size must not be negative", reason="BAD_FIELD_VALUE", field="page_size")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        q = select(Job).where(Job.tenant == tenant)
        if status:
            q = q.where(Job.status == status)
        if page_token:
            created, last_id = _decode_token(page_token)
            q = q.where(or_(Job.created_at < created, and_(Job.created_at == created, Job.id < last_id)))
        q = q.order_by(Job.created_at.desc(), Job.id.desc()).limit(size + 1)
        async with self.sessions() as s:
            jobs = list((await s.execute(q)).scalars())
        token = ""
        if len(jobs) > size:
            jobs = jobs[:size]
            token = _encode_token(jobs[-1].created_at, jobs[-1].id)
        return jobs, token

    async def chunks(self, job_id: str, tenant: str | None = None) -> list[Chunk]:
        await self.get_job(job_id, tenant)
        async with self.sessions() as s:
            chunks = list(
                (await s.execute(select(Chunk).where(Chunk.job_id == job_id).order_by(Chunk.idx))).scalars()
            )
        for c in chunks:  # detached rows: decrypted for the reader, never written back
            c.text = self.sealer.open_text(c.text)
            c.segments_json = self.sealer.open_text(c.segments_json)
        return chunks

    async def partial_text(self, job_id: str) -> str:
        async with self.sessions() as s:
            texts = (
                await s.execute(
                    select(Chunk.text)
                    .where(Chunk.job_id == job_id, Chunk.status == ChunkState.COMPLETED)
                    .order_by(Chunk.idx)
                )
            ).scalars()
            return join_texts(self.sealer.open_text(t) for t in texts)

    async def audio_retained(self, jobs: Sequence[Job]) -> set[str]:
        """Ids of the jobs whose audio is still stored (what Job.audio_retained reports): the job
        says so (its audio is deleted on completion unless kept) and the blob is there."""
        kept = [j for j in jobs if j.audio_retained]
        keys = await self.blobs.existing([j.blob_key for j in kept])
        return {j.id for j in kept if j.blob_key in keys}

    async def read_audio(self, job_id: str, tenant: str | None = None) -> AsyncIterator[bytes]:
        job = await self.get_job(job_id, tenant)
        if not job.audio_retained:
            raise WrongState(f"the audio of job {job_id} is no longer kept", reason="AUDIO_NOT_KEPT")
        async for piece in self.sealer.open_stream(self.blobs.read(job.blob_key)):
            yield piece

    async def watch(self, job_id: str, tenant: str | None = None) -> AsyncIterator[tuple[Job, str]]:
        """Current state first, then each change, until terminal. Re-checks SQL every reconcile
        interval in case a notice was lost."""
        last: tuple[Any, ...] | None = None
        while True:
            notice = self.bus.job_future(job_id)  # registered before reading: no change slips by
            try:
                job = await self.get_job(job_id, tenant)
                state = (
                    job.status,
                    job.chunks_completed,
                    job.chunks_total,
                    job.retry_count,
                    job.interruption_count,
                    job.updated_at,
                )
                if state != last:
                    last = state
                    yield job, await self.partial_text(job_id)
                if Status(job.status).terminal:
                    return
                await wait(notice, self.reconcile_seconds)
            finally:
                self.bus.release_job(job_id, notice)

    # -- user actions -------------------------------------------------------------------------------

    async def cancel(self, job_id: str, tenant: str | None = None) -> Job:
        job = await self.get_job(job_id, tenant)
        now = utcnow()
        async with self.sessions.begin() as s:
            res = await s.execute(
                update(Job)
                .where(Job.id == job_id, Job.status.in_([Status.QUEUED, Status.RUNNING]))
                .values(
                    status=Status.CANCELLED,
                    completed_at=now,
                    updated_at=now,
                    expires_at=now + dt.timedelta(seconds=self.result_ttl),
                    lease_expires_at=None,
                    error_message="cancelled by request",
                )
            )
        if res.rowcount == 0:  # type: ignore[attr-defined]
            job = await self.get_job(job_id, tenant)
            if job.status != Status.CANCELLED:
                raise WrongState(
                    f"job {job_id} is already {job.status}; only QUEUED or RUNNING jobs can be cancelled",
                    reason="JOB_FINISHED",
                )
            return job
        log.info("job cancelled", extra={"job_id": job_id})
        await self.bus.publish_job(job_id)
        return await self.get_job(job_id, tenant)

    async def retry(self, job_id: str, tenant: str | None = None) -> Job:
        """Queue a FAILED or CANCELLED job again under its id (and request_id), with a fresh attempt
        budget: its counters start from 0. Chunks already transcribed are kept; the others start
        over. Idempotent: a QUEUED or RUNNING job (e.g. one a first RetryJob call already queued)
        is returned unchanged. COMPLETED: JOB_NOT_RETRYABLE; audio gone: AUDIO_NOT_KEPT."""
        job = await self.get_job(job_id, tenant)
        retryable = (Status.FAILED, Status.CANCELLED)
        if job.status in (Status.QUEUED, Status.RUNNING):
            return job
        if job.status not in retryable:
            raise WrongState(
                f"job {job_id} is {job.status}; only FAILED or CANCELLED jobs can be retried",
                reason="JOB_NOT_RETRYABLE",
            )
        if not job.audio_retained or not await self.blobs.exists(job.blob_key):
            raise WrongState(
                f"the audio of job {job_id} is no longer kept; upload it again", reason="AUDIO_NOT_KEPT"
            )
        now = utcnow()
        async with self.sessions.begin() as s:
            res = await s.execute(
                update(Job)
                .where(Job.id == job_id, Job.status.in_(retryable))
                .values(
                    status=Status.QUEUED,
                    retry_count=0,
                    interruption_count=0,
                    stall_count=0,
                    not_before=None,
                    error_message=None,
                    failure_reason=None,
                    worker_id=None,
                    lease_expires_at=None,
                    completed_at=None,
                    expires_at=None,
                    updated_at=now,
                )
            )
            if res.rowcount == 1:  # type: ignore[attr-defined]
                await s.execute(
                    update(Chunk)
                    .where(Chunk.job_id == job_id, Chunk.status != ChunkState.COMPLETED)
                    .values(status=ChunkState.PENDING, attempts=0, error=None)
                )
        if res.rowcount != 1:  # type: ignore[attr-defined]
            # Changed under us: retried by a concurrent call (fine), or completed/deleted.
            return await self.retry(job_id, tenant)
        log.info("job queued again", extra={"job_id": job_id})
        await self.bus.publish_wake()
        await self.bus.publish_job(job_id)
        return await self.get_job(job_id, tenant)

    async def delete(self, job_id: str, tenant: str | None = None) -> None:
        job = await self.get_job(job_id, tenant)
        async with self.sessions.begin() as s:
            await s.execute(delete(Job).where(Job.id == job_id))
        await self.blobs.delete(job.blob_key)
        log.info("job deleted", extra={"job_id": job_id})
        await self.bus.publish_job(job_id)

    async def queue_stats(self) -> QueueStats:
        now = utcnow()
        stats = {p: PriorityStat(int(p)) for p in sorted(Priority, reverse=True)}
        async with self.sessions() as s:
            rows = await s.execute(
                select(
                    Job.priority,
                    Job.status,
                    func.count(),
                    func.min(Job.created_at),
                    func.count(Job.worker_id.distinct()),
                )
                .where(Job.status.in_([Status.QUEUED, Status.RUNNING]))
                .group_by(Job.priority, Job.status)
            )
            workers = (
                await s.execute(
                    select(func.count(Job.worker_id.distinct())).where(Job.status == Status.RUNNING)
                )
            ).scalar_one()
        for priority, status, count, oldest, holders in rows:
            st = stats.setdefault(Priority(priority), PriorityStat(priority))
            if status == Status.QUEUED:
                st.pending = count
                st.oldest_wait = max(0.0, (now - _aware(oldest)).total_seconds()) if oldest else 0.0
            else:
                st.running = count
                st.workers = holders
        return QueueStats(list(stats.values()), max(workers, self._recent_workers()))

    def _seen(self, worker_id: str) -> None:
        self._seen_workers[worker_id] = asyncio.get_running_loop().time()

    def _recent_workers(self, window: float = WORKER_WINDOW_SECONDS) -> int:
        """Dispatchers seen within the window; older entries are forgotten (the map stays small)."""
        now = asyncio.get_running_loop().time()
        for worker, seen in list(self._seen_workers.items()):
            if now - seen > window:
                del self._seen_workers[worker]
        return len(self._seen_workers)

    # -- the holder's side: claims, heartbeats, checkpoints -----------------------------------------

    async def claim(
        self, worker_id: str, lease_seconds: float = 0.0, wait_seconds: float = 0.0
    ) -> Job | None:
        """The highest-priority, oldest queued job, under a new lease epoch; waits for one."""
        if not worker_id:
            raise InvalidInput("worker_id is required", reason="MISSING_FIELD", field="worker_id")
        loop = asyncio.get_running_loop()
        self._seen(worker_id)
        deadline = loop.time() + max(wait_seconds, 0.0)
        while True:
            wake = self.bus.wake_future()
            try:
                job = await self._claim_once(worker_id, lease_seconds or self.lease_seconds)
                if job is not None:
                    return job
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return None
                await wait(wake, min(remaining, self.reconcile_seconds))
            finally:
                self.bus.release_wake(wake)

    async def _claim_once(self, worker_id: str, lease_seconds: float) -> Job | None:
        for _ in range(5):
            now = utcnow()
            async with self.sessions.begin() as s:
                candidate = (
                    await s.execute(
                        select(Job.id)
                        .where(
                            Job.status == Status.QUEUED,
                            or_(Job.not_before.is_(None), Job.not_before <= now),
                        )
                        .order_by(Job.priority.desc(), Job.created_at, Job.id)
                        .limit(1)
                        .with_for_update(skip_locked=True)
                    )
                ).scalar_one_or_none()
                if candidate is None:
                    return None
                res = await s.execute(
                    update(Job)
                    .where(Job.id == candidate, Job.status == Status.QUEUED)
                    .values(
                        status=Status.RUNNING,
                        worker_id=worker_id,
                        lease_epoch=Job.lease_epoch + 1,
                        lease_expires_at=now + dt.timedelta(seconds=lease_seconds),
                        started_at=func.coalesce(Job.started_at, literal(now, UTCDateTime())),
                        updated_at=now,
                    )
                )
                if res.rowcount != 1:  # type: ignore[attr-defined]
                    continue  # someone else took it: try the next one
            job = await self.get_job(candidate)
            log.info(
                "job claimed",
                extra={
                    "job_id": job.id,
                    "worker": worker_id,
                    "epoch": job.lease_epoch,
                    "retry": job.retry_count,
                    "interruptions": job.interruption_count,
                },
            )
            await self.bus.publish_job(job.id)
            return job
        return None

    async def _fence(self, s: AsyncSession, lease: Lease, **values: Any) -> None:
        """The first statement of every holder write: refuse unless the lease is current."""
        now = utcnow()
        values.setdefault("updated_at", now)
        res = await s.execute(
            update(Job)
            .where(Job.id == lease.job_id, Job.lease_epoch == lease.epoch, Job.status == Status.RUNNING)
            .values(**values)
        )
        if res.rowcount == 1:  # type: ignore[attr-defined]
            return
        job = await s.get(Job, lease.job_id)
        if job is None:
            raise NotFound(f"job {lease.job_id!r} not found", reason="JOB_NOT_FOUND")
        if job.status == Status.CANCELLED:
            raise Aborted(f"job {lease.job_id} was cancelled", reason="JOB_CANCELLED")
        raise Aborted(
            f"stale lease on job {lease.job_id}: epoch {lease.epoch}, "
            f"current {job.lease_epoch} ({job.status})",
            reason="STALE_LEASE",
            metadata={"current_epoch": str(job.lease_epoch)},
        )

    async def heartbeat(self, lease: Lease) -> tuple[dt.datetime | None, bool]:
        """Extend the lease. Returns (new expiry, cancelled)."""
        self._seen(lease.worker_id)
        expires = utcnow() + dt.timedelta(seconds=lease.seconds or self.lease_seconds)
        try:
            async with self.sessions.begin() as s:
                await self._fence(s, lease, lease_expires_at=expires)
        except Aborted as exc:
            if exc.reason == "JOB_CANCELLED":
                return None, True
            raise
        return expires, False

    async def set_plan(self, lease: Lease, spans: Sequence[Span]) -> list[Chunk]:
        """Record the chunk plan once; later calls (a resumed job) get the recorded plan back."""
        if not spans:
            raise InvalidInput(
                "a chunk plan needs at least one chunk", reason="MISSING_FIELD", field="chunks"
            )
        for i, sp in enumerate(sorted(spans, key=lambda x: x.index)):
            if sp.index != i or sp.end < sp.start:
                raise InvalidInput(
                    "chunks must be numbered 0..n-1 with end >= start",
                    reason="BAD_FIELD_VALUE",
                    field="chunks",
                )
        async with self.sessions.begin() as s:
            await self._fence(s, lease)
            existing = (
                await s.execute(select(func.count()).where(Chunk.job_id == lease.job_id))
            ).scalar_one()
            if existing == 0:
                s.add_all(
                    Chunk(job_id=lease.job_id, idx=sp.index, start_time=sp.start, end_time=sp.end,
                          status=ChunkState.PENDING, attempts=0)
                    for sp in spans
                )  # fmt: skip
                await s.execute(
                    update(Job).where(Job.id == lease.job_id).values(chunks_total=len(spans), stall_count=0)
                )
        await self.bus.publish_job(lease.job_id)
        return await self.chunks(lease.job_id)

    async def complete_chunk(
        self, lease: Lease, index: int, segments: Sequence[Segment], language: str | None
    ) -> ChunkUpdate:
        """Checkpoint one chunk. The first recorded result of a chunk stands."""
        now = utcnow()
        text = join_text(segments)
        async with self.sessions.begin() as s:
            await self._fence(s, lease, stall_count=0)  # progress: the stall streak ends
            chunk = await s.get(Chunk, (lease.job_id, index))
            if chunk is None:
                raise InvalidInput(
                    f"job {lease.job_id} has no chunk {index}", reason="BAD_FIELD_VALUE", field="index"
                )
            if chunk.status != ChunkState.COMPLETED:
                await s.execute(
                    update(Chunk)
                    .where(
                        Chunk.job_id == lease.job_id, Chunk.idx == index, Chunk.status != ChunkState.COMPLETED
                    )
                    .values(
                        status=ChunkState.COMPLETED,
                        text=self.sealer.seal_text(text),
                        segments_json=self.sealer.seal_text(json.dumps([seg.to_dict() for seg in segments])),
                        language=language,
                        processed_at=now,
                        attempts=Chunk.attempts + 1,
                        error=None,
                        lease_epoch=lease.epoch,
                    )
                )
            done, total = await self._recount(s, lease.job_id)
        await self.bus.publish_job(lease.job_id)
        return ChunkUpdate(done, total)

    async def _recount(self, s: AsyncSession, job_id: str) -> tuple[int, int]:
        done = (
            await s.execute(
                select(func.count()).where(Chunk.job_id == job_id, Chunk.status == ChunkState.COMPLETED)
            )
        ).scalar_one()
        total = (await s.execute(select(func.count()).where(Chunk.job_id == job_id))).scalar_one()
        await s.execute(update(Job).where(Job.id == job_id).values(chunks_completed=done))
        return int(done), int(total)

    async def fail_chunk(self, lease: Lease, index: int, error: str, reason: str = "") -> ChunkUpdate:
        """Charge one attempt for a chunk that failed with an error of its own (`reason`: its
        ErrorReason name). When the job's charged attempts reach max_attempts, it FAILS."""
        now = utcnow()
        async with self.sessions.begin() as s:
            await self._fence(s, lease)
            chunk = await s.get(Chunk, (lease.job_id, index))
            job = await s.get(Job, lease.job_id)
            if chunk is None or job is None:
                raise InvalidInput(
                    f"job {lease.job_id} has no chunk {index}", reason="BAD_FIELD_VALUE", field="index"
                )
            if chunk.status == ChunkState.COMPLETED:
                done, total = await self._recount(s, lease.job_id)
                return ChunkUpdate(done, total, chunk.attempts)
            attempts = chunk.attempts + 1
            charged = job.retry_count + 1
            failed = charged >= job.max_attempts
            await s.execute(
                update(Chunk)
                .where(Chunk.job_id == lease.job_id, Chunk.idx == index)
                .values(
                    attempts=attempts,
                    error=error[:2000],
                    status=ChunkState.FAILED if failed else ChunkState.PENDING,
                    processed_at=now,
                )
            )
            done, total = await self._recount(s, lease.job_id)
            span = f"{chunk.start_time:.1f}-{chunk.end_time:.1f}s"
            times = "once" if attempts == 1 else f"{attempts} times"
            message = f"chunk {index} ({span}) failed {times}: {error}"
            values: dict[str, Any] = {"retry_count": charged}
            if failed:
                values |= self._failed_values(
                    f"{message} (attempt {charged} of {job.max_attempts})", reason or "MODEL_ERROR"
                )
            await s.execute(update(Job).where(Job.id == lease.job_id).values(**values))
        if failed:
            log.warning("job failed", extra={"job_id": lease.job_id, "error": message})
        await self.bus.publish_job(lease.job_id)
        return ChunkUpdate(done, total, attempts, failed)

    def _failed_values(self, message: str, reason: str) -> dict[str, Any]:
        now = utcnow()
        return {
            "status": Status.FAILED,
            "error_message": message[:4000],
            "failure_reason": reason[:64] or "INTERNAL",
            "completed_at": now,
            "updated_at": now,
            "lease_expires_at": None,
            "not_before": None,
            "expires_at": now + dt.timedelta(seconds=self.failed_ttl),
        }

    async def complete_job(self, lease: Lease, transcript: str, language: str | None) -> Job:
        now = utcnow()
        async with self.sessions.begin() as s:
            await self._fence(s, lease)
            missing = (
                await s.execute(
                    select(func.count()).where(
                        Chunk.job_id == lease.job_id, Chunk.status != ChunkState.COMPLETED
                    )
                )
            ).scalar_one()
            if missing:
                raise WrongState(
                    f"{missing} chunks of job {lease.job_id} are not completed", reason="CHUNKS_MISSING"
                )
            await s.execute(
                update(Job)
                .where(Job.id == lease.job_id)
                .values(
                    status=Status.COMPLETED,
                    transcript=self.sealer.seal_text(transcript),
                    detected_language=language,
                    completed_at=now,
                    lease_expires_at=None,
                    error_message=None,
                    failure_reason=None,
                    expires_at=now + dt.timedelta(seconds=self.result_ttl),
                )
            )
        log.info("job completed", extra={"job_id": lease.job_id})
        await self._drop_audio_unless_kept(lease.job_id)
        await self.bus.publish_job(lease.job_id)
        return await self.get_job(lease.job_id)

    async def _drop_audio_unless_kept(self, job_id: str) -> None:
        """Data minimisation: a COMPLETED job's audio goes at once unless the job asked to keep it
        (FAILED and CANCELLED jobs keep theirs until they expire, so RetryJob can re-run them)."""
        async with self.sessions.begin() as s:
            key = (
                await s.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.status == Status.COMPLETED, Job.keep_audio == false())
                    .where(Job.audio_retained == true())
                    .values(audio_retained=False)
                    .returning(Job.blob_key)
                )
            ).scalar_one_or_none()
        if key is not None:
            await self.blobs.delete(key)
            log.info("audio deleted on completion", extra={"job_id": job_id})

    async def fail_job(self, lease: Lease, error: str, reason: str = "") -> Job:
        """The job cannot succeed (e.g. its audio no longer decodes): FAILED now, no retry."""
        async with self.sessions.begin() as s:
            await self._fence(s, lease, **self._failed_values(error, reason))
        log.warning("job failed", extra={"job_id": lease.job_id, "error": error})
        await self.bus.publish_job(lease.job_id)
        return await self.get_job(lease.job_id)

    async def release(self, lease: Lease) -> Job:
        """Hand the job back to the queue (graceful shutdown): an interruption, never charged, no
        backoff, and it does not add to the stall streak (the worker left in good order)."""
        async with self.sessions.begin() as s:
            await self._fence(
                s,
                lease,
                status=Status.QUEUED,
                worker_id=None,
                lease_expires_at=None,
                not_before=None,
                interruption_count=Job.interruption_count + 1,
                error_message="interrupted: its worker shut down and handed it back; resumes on the next",
            )
        log.info("job released", extra={"job_id": lease.job_id})
        await self.bus.publish_wake()
        await self.bus.publish_job(lease.job_id)
        return await self.get_job(lease.job_id)

    # -- housekeeping -------------------------------------------------------------------------------

    def backoff(self, stalls: int) -> float:
        """Seconds a job waits before its next claim after `stalls` interruptions in a row without
        progress: none after the first, then 1, 2, 4, ... up to the maximum."""
        if stalls <= 1:
            return 0.0
        return float(min(self.max_backoff_seconds, self.backoff_seconds * 2 ** (stalls - 2)))

    async def reap_expired(self, *, all_running: bool = False) -> list[str]:
        """Jobs whose worker is gone go back to the queue: those whose lease expired, or with
        all_running every RUNNING job (a single-process stack restarting). An interruption, not
        charged, unless the job keeps losing its worker without progress (see the module doc)."""
        now = utcnow()
        cause = "the service restarted while it ran" if all_running else "its worker stopped responding"
        expired = (Job.status == Status.RUNNING) & (true() if all_running else Job.lease_expires_at < now)
        requeued: list[str] = []
        failed: list[str] = []
        async with self.sessions.begin() as s:
            rows = (
                await s.execute(
                    select(
                        Job.id,
                        Job.lease_epoch,
                        Job.retry_count,
                        Job.max_attempts,
                        Job.interruption_count,
                        Job.stall_count,
                    )
                    .where(expired)
                    .with_for_update(skip_locked=True)
                )
            ).all()
            for job_id, epoch, retries, max_attempts, interruptions, stalls in rows:
                stalls += 1
                charged = stalls > self.stalls_before_charge
                retries += int(charged)
                values: dict[str, Any] = {
                    "interruption_count": interruptions + 1,
                    "stall_count": stalls,
                    "retry_count": retries,
                }
                if charged and retries >= max_attempts:
                    values |= self._failed_values(
                        f"its worker was lost {stalls} times in a row while holding it, with no progress in "
                        f"between (last: {cause}): the job is presumed to be what stops it",
                        "WORKER_LOST",
                    )
                else:
                    note = f"; charged ({stalls} in a row without progress)" if charged else ""
                    values |= {
                        "status": Status.QUEUED,
                        "worker_id": None,
                        "lease_expires_at": None,
                        "updated_at": now,
                        "not_before": now + dt.timedelta(seconds=self.backoff(stalls)),
                        "error_message": f"interrupted: {cause}; resumes on the next worker{note}",
                    }
                res = await s.execute(
                    update(Job).where(expired, Job.id == job_id, Job.lease_epoch == epoch).values(**values)
                )
                if res.rowcount == 1:  # type: ignore[attr-defined]
                    (failed if values["status"] == Status.FAILED else requeued).append(job_id)
        for job_id in requeued:
            log.warning("worker lost (%s); job requeued", cause, extra={"job_id": job_id})
        for job_id in failed:
            log.warning("worker lost again without progress; job failed", extra={"job_id": job_id})
        if requeued:
            await self.bus.publish_wake()
        for job_id in requeued + failed:
            await self.bus.publish_job(job_id)
        return requeued + failed

    async def sweep(self, orphan_age: float = 3600.0) -> int:
        """Remove expired jobs (rows, chunks, audio) and audio blobs that belong to no job."""
        now = utcnow()
        async with self.sessions.begin() as s:
            keys = list(
                (await s.execute(delete(Job).where(Job.expires_at < now).returning(Job.blob_key))).scalars()
            )
        for key in keys:
            await self.blobs.delete(key)
        old = await self.blobs.keys_older_than(orphan_age)
        if old:
            async with self.sessions() as s:
                known = set((await s.execute(select(Job.blob_key).where(Job.blob_key.in_(old)))).scalars())
            for key in set(old) - known:
                await self.blobs.delete(key)
                keys.append(key)
        if keys:
            log.info("swept %d expired jobs or orphaned blobs", len(keys))
        return len(keys)


class _Counted:
    """An upload's pieces, counted (plaintext bytes) and held to the store's own size limit."""

    def __init__(self, pieces: AsyncIterator[bytes], limit: int | None) -> None:
        self.pieces = pieces
        self.limit = limit
        self.size = 0

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._run()

    async def _run(self) -> AsyncIterator[bytes]:
        async for piece in self.pieces:
            self.size += len(piece)
            if self.limit is not None and self.size > self.limit:
                raise LimitExceeded(
                    f"upload is over the jobstore's {self.limit} byte limit",
                    reason="AUDIO_TOO_LARGE",
                    field="audio_chunk",
                    metadata={"limit_bytes": str(self.limit)},
                )
            yield piece


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def _encode_token(created: dt.datetime, job_id: str) -> str:
    raw = json.dumps([created.isoformat(), job_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_token(token: str) -> tuple[dt.datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        created, job_id = json.loads(raw)
        return dt.datetime.fromisoformat(created), str(job_id)
    except Exception:
        raise InvalidInput("page_token is not valid", reason="BAD_PAGE_TOKEN", field="page_token") from None
