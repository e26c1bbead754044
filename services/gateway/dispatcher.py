"""The job dispatcher: claims jobs under a lease, cuts them into chunks at pauses, transcribes the
chunks that are not yet recorded through the transcriber pool, checkpoints each one, completes the
job. No grpc here: the jobstore is a JobQueue, the pool a transcribe callable.

Crash safety: every finished chunk is recorded at once (fenced by the lease epoch), so whoever holds
the job next transcribes only what is missing. The chunk plan is recorded once and reused, so a
resumed job produces the same chunks and hence the same transcript.

Attempts are charged to the cause: a chunk error of the job's own (a model error, a timeout, every
replica failing the call) is reported to the jobstore, which charges an attempt; a missing capacity
(no transcriber ready, one draining or loading, a full queue, the jobstore away) is not the job's
fault: the chunk waits with backoff and tries again, for as long as the lease is held. The job's
spool (its audio and decoded samples) lives in this process's scratch space (services.shared.spool)
and is removed when the work ends; whatever a crash left is removed at the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

import numpy as np
from prometheus_client import Counter as PCounter
from prometheus_client import Gauge, Histogram

from services.gateway import observe
from services.gateway.audio import Limits, decode_to_file
from services.gateway.chunking import VadSettings, Window, merge, plan_windows, speech_regions_long
from services.gateway.jobqueue import ChunkInfo, ClaimedJob, JobQueue, Lease
from services.gateway.recognize import first_leaf
from services.shared import tracing
from services.shared.backoff import Backoff
from services.shared.context import job_id_var
from services.shared.domain import SAMPLE_RATE, DecodeOptions, Segment, WindowResult, WorkClass, join_text
from services.shared.errors import Aborted, InvalidInput, LimitExceeded, NotFound, ServiceError, Unavailable
from services.shared.pcm import from_pcm16
from services.shared.spool import Spool

log = logging.getLogger("gateway.dispatcher")

T = TypeVar("T")
TranscribeFn = Callable[[np.ndarray, DecodeOptions, WorkClass], Awaitable[WindowResult]]

JOBS = PCounter("stt_dispatcher_jobs_total", "Jobs finished by this dispatcher", ["outcome"])
JOB_SECONDS = Histogram(
    "stt_dispatcher_job_seconds",
    "Wall time from claim to the job's end",
    buckets=(1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200),
)
CHUNKS = PCounter("stt_dispatcher_chunks_total", "Chunks transcribed", ["outcome"])
RUNNING = Gauge("stt_dispatcher_running_jobs", "Jobs this dispatcher holds")

# Errors that say capacity is missing, not that the chunk is bad: never charged to the job.
NOT_THE_JOBS_FAULT = frozenset(
    {"NO_TRANSCRIBER", "DRAINING", "MODEL_LOADING", "QUEUE_FULL", "STORE_UNAVAILABLE", "CAPACITY_EXHAUSTED"}
)


class JobStopped(Exception):
    """The job was cancelled, its lease lost, or this dispatcher is shutting down."""


@dataclass
class DispatcherConfig:
    worker_id: str
    concurrency: int = 2
    lease_seconds: float = 30.0
    heartbeat_seconds: float = 2.0
    claim_wait_seconds: float = 10.0
    max_parallel_chunks: int = 16
    chunk_retry_seconds: float = 1.0
    # Waiting for capacity (not charged): first wait, doubling up to the max.
    capacity_retry_seconds: float = 0.5
    max_capacity_retry_seconds: float = 10.0
    limits: Limits = field(default_factory=lambda: Limits(1 << 30, 4 * 3600.0))
    vad: VadSettings = field(default_factory=VadSettings)
    spool_dir: str | None = None


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Dispatcher:
    def __init__(
        self, queue: JobQueue, transcribe: TranscribeFn, config: DispatcherConfig, spool: Spool | None = None
    ) -> None:
        self.queue = queue
        self.transcribe = transcribe
        self.config = config
        self.spool = spool or Spool(
            config.spool_dir or os.path.join(tempfile.gettempdir(), "stt-spool"), name="dispatcher"
        )
        self._slots: list[asyncio.Task[None]] = []
        self._stopping = False
        self.active: dict[str, asyncio.Task[str]] = {}

    def start(self) -> None:
        self._slots = [
            asyncio.create_task(self._slot(i), name=f"dispatch-{i}") for i in range(self.config.concurrency)
        ]
        log.info("dispatcher %s started with %d slots", self.config.worker_id, self.config.concurrency)

    async def stop(self) -> None:
        """Stop claiming; hand running jobs back to the queue (their finished chunks are kept)."""
        self._stopping = True
        for task in self._slots:
            task.cancel()
        await asyncio.gather(*self._slots, return_exceptions=True)
        self._slots = []

    async def _slot(self, index: int) -> None:
        backoff = Backoff(maximum=5.0)
        while not self._stopping:
            try:
                job = await self.queue.claim(
                    self.config.worker_id, self.config.lease_seconds, self.config.claim_wait_seconds
                )
                backoff.reset()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # jobstore unreachable: keep trying
                delay = backoff.next()
                log.warning("claim failed (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                continue
            if job is not None:
                await self._process(job)

    async def _process(self, job: ClaimedJob) -> None:
        lease = Lease(job.job_id, self.config.worker_id, job.epoch, self.config.lease_seconds)
        token = job_id_var.set(job.job_id)
        started = time.monotonic()
        span = observe.job_started(job, self.config.worker_id)
        with tracing.activate(span):  # the work (not the heartbeats) continues the job's trace
            work = asyncio.create_task(self._work(job, lease), name=f"job-{job.job_id}")
        self.active[job.job_id] = work
        heartbeat = asyncio.create_task(self._heartbeat(lease, work), name=f"heartbeat-{job.job_id}")
        RUNNING.inc()
        outcome = "error"
        try:
            outcome = await work
        except asyncio.CancelledError:
            if self._stopping:
                outcome = "released"
                with contextlib.suppress(Exception):
                    await self.queue.release(lease)
                log.info("job handed back on shutdown")
            elif not work.cancelled():
                raise
            else:
                outcome = "stopped"
        except JobStopped as exc:
            outcome = "stopped"
            log.info("job stopped: %s", exc)
        except (Aborted, NotFound) as exc:  # cancelled, deleted or taken over while we wrote
            outcome = "stopped"
            log.info("job stopped: %s", exc.message)
        except Exception:
            log.exception("job processing failed; the lease will expire and the job be retried")
        finally:
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)
            self.active.pop(job.job_id, None)
            RUNNING.dec()
            JOBS.labels(outcome).inc()
            JOB_SECONDS.observe(time.monotonic() - started)
            tracing.end(span, {"stt.outcome": outcome})
            job_id_var.reset(token)

    async def _heartbeat(self, lease: Lease, work: asyncio.Task[str]) -> None:
        """Renew the lease; stop the work when the job is cancelled or the lease is lost."""
        last_ok = time.monotonic()
        while not work.done():
            await asyncio.sleep(self.config.heartbeat_seconds)
            try:
                if await self.queue.heartbeat(lease):
                    log.info("job was cancelled: stopping its work")
                    work.cancel()
                    return
                last_ok = time.monotonic()
            except (Aborted, NotFound) as exc:
                log.warning("lease lost (%s): stopping work", exc)
                work.cancel()
                return
            except Exception as exc:
                if time.monotonic() - last_ok > lease.seconds:
                    log.warning("could not renew the lease for %.0fs (%s): stopping work", lease.seconds, exc)
                    work.cancel()
                    return

    async def _persist(self, lease: Lease, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """A write to the jobstore, retried while it is briefly unavailable (a restart, a database
        failover) for as long as the lease would last; fencing makes the retries safe."""
        deadline = time.monotonic() + lease.seconds
        backoff = Backoff(maximum=3.0)
        while True:
            try:
                return await call()
            except Unavailable as exc:
                delay = backoff.next()
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("%s: jobstore unavailable (%s); retrying", what, exc.message)
                await asyncio.sleep(delay)

    async def _work(self, job: ClaimedJob, lease: Lease) -> str:
        spool = await asyncio.to_thread(self.spool.mkdtemp, f"job-{job.job_id}-")
        try:
            return await self._run(job, lease, spool)
        finally:
            shutil.rmtree(spool, ignore_errors=True)

    async def _run(self, job: ClaimedJob, lease: Lease, spool: str) -> str:
        source = os.path.join(spool, "source")
        fh = await asyncio.to_thread(open, source, "wb")
        try:
            async for piece in self.queue.read_audio(job.job_id):
                await asyncio.to_thread(fh.write, piece)
        finally:
            fh.close()
        pcm_path = os.path.join(spool, "pcm")
        try:
            info = await asyncio.to_thread(
                decode_to_file,
                source,
                pcm_path,
                limits=self.config.limits,
                encoding=job.encoding,
                sample_rate=job.sample_rate,
                channels=job.channels,
            )
        except (InvalidInput, LimitExceeded) as exc:
            await self.queue.fail_job(lease, f"audio could not be decoded: {exc.message}", exc.reason)
            return "failed"
        pcm = np.memmap(pcm_path, dtype="<i2", mode="r") if info.seconds > 0 else np.zeros(0, dtype="<i2")
        chunks = await self._plan(job, lease, pcm)
        if not chunks:  # no speech at all
            await self.queue.complete_job(lease, "", job.options.language or "")
            return "completed"
        pending = [c for c in chunks if not c.completed]
        log.info(
            "transcribing %d of %d chunks%s",
            len(pending),
            len(chunks),
            f" (resumed after {job.interruption_count} interruptions, {job.retry_count} attempts charged)"
            if len(pending) < len(chunks)
            else "",
        )
        sem = asyncio.Semaphore(self.config.max_parallel_chunks)
        failed = asyncio.Event()

        async def one(chunk: ChunkInfo) -> None:
            async with sem:
                await self._chunk(job, lease, pcm, chunk, failed)

        try:
            async with asyncio.TaskGroup() as tg:
                for chunk in pending:
                    tg.create_task(one(chunk))
        except BaseExceptionGroup as group:
            raise first_leaf(group) from None
        if failed.is_set():
            return "failed"
        final = await self._persist(lease, "chunks", lambda: self.queue.chunks(job.job_id))
        segments = [s for c in final for s in c.segments]
        languages = Counter(c.language for c in final if c.language)
        language = languages.most_common(1)[0][0] if languages else (job.options.language or "")
        transcript = join_text(segments)
        await self._persist(lease, "complete", lambda: self.queue.complete_job(lease, transcript, language))
        return "completed"

    async def _plan(self, job: ClaimedJob, lease: Lease, pcm: np.ndarray) -> list[ChunkInfo]:
        if job.chunks_total:
            return await self._persist(lease, "plan", lambda: self.queue.chunks(job.job_id))  # resume
        regions = await asyncio.to_thread(speech_regions_long, pcm, self.config.vad)
        windows = plan_windows(pcm, regions)
        if not windows:
            return []
        spans = [(w.start_seconds, w.end_seconds) for w in windows]
        return await self._persist(lease, "plan", lambda: self.queue.set_plan(lease, spans))

    async def _chunk(
        self, job: ClaimedJob, lease: Lease, pcm: np.ndarray, chunk: ChunkInfo, failed: asyncio.Event
    ) -> None:
        start = round(chunk.start * SAMPLE_RATE)
        end = round(chunk.end * SAMPLE_RATE)
        audio = from_pcm16(pcm[start:end])
        window = Window(start, end)
        waits = Backoff(self.config.capacity_retry_seconds, self.config.max_capacity_retry_seconds)
        while not failed.is_set():
            try:
                result = await tracing.traced(
                    "job.chunk",
                    self.transcribe(audio, job.options, WorkClass.BATCH),
                    {"stt.chunk_index": chunk.index, "stt.audio_seconds": round(chunk.end - chunk.start, 3)},
                )
            except InvalidInput as exc:
                # The request itself is wrong (e.g. a language the model cannot do): no retry helps.
                failed.set()
                await self.queue.fail_job(lease, f"chunk {chunk.index}: {exc.message}", exc.reason)
                CHUNKS.labels("invalid").inc()
                return
            except ServiceError as exc:
                if exc.reason in NOT_THE_JOBS_FAULT:
                    CHUNKS.labels("waiting").inc()
                    wait = waits.next()
                    log.warning(
                        "chunk %d waits for capacity (%s); retrying in %.1fs", chunk.index, exc.message, wait
                    )
                    await asyncio.sleep(wait)
                    continue
                CHUNKS.labels("error").inc()
                log.warning("chunk %d failed: %s", chunk.index, exc.message)
                if await self._persist(
                    lease,
                    "fail chunk",
                    partial(self.queue.fail_chunk, lease, chunk.index, exc.message, exc.reason),
                ):
                    failed.set()
                    return
                await asyncio.sleep(self.config.chunk_retry_seconds)
                continue
            segments: list[Segment] = merge([window], [result.segments])
            await self._persist(
                lease,
                f"chunk {chunk.index}",
                partial(self.queue.complete_chunk, lease, chunk.index, segments, result.language),
            )
            CHUNKS.labels("ok").inc()
            return
