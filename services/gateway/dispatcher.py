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
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import numpy as np
from prometheus_client import Counter as PCounter
from prometheus_client import Gauge, Histogram

from services.gateway import observe
from services.gateway.audio import Limits, iter_source
from services.gateway.chunking import (
    StreamingPlanner,
    VadSettings,
    Window,
    WindowGroups,
    merge,
)
from services.gateway.jobqueue import ChunkInfo, ClaimedJob, JobQueue, Lease
from services.gateway.recognize import first_leaf
from services.shared import memory, tracing
from services.shared.backoff import Backoff
from services.shared.context import job_id_var
from services.shared.domain import SAMPLE_RATE, DecodeOptions, Segment, WindowResult, WorkClass, join_text
from services.shared.errors import Aborted, InvalidInput, LimitExceeded, NotFound, ServiceError, Unavailable
from services.shared.pcm import from_pcm16, to_pcm16
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


class _AudioFailed(Exception):
    """The job's audio failed to decode (the job is already marked failed)."""


class PcmFile:
    """A job's decoded audio on disk: 16 kHz mono 16-bit, read a window at a time."""

    def __init__(self, path: str) -> None:
        self.path = path

    def read(self, start: int, end: int) -> np.ndarray:
        return np.fromfile(self.path, dtype="<i2", count=max(0, end - start), offset=2 * start)


@dataclass
class JobTimeline:
    """Where a job's time goes (seconds from the claim): the bench prints it (`timelines`)."""

    t0: float
    marks: dict[str, float] = field(default_factory=dict)
    windows: list[dict[str, float]] = field(default_factory=list)
    vad_seconds: float = 0.0
    _planned: dict[tuple[int, int], float] = field(default_factory=dict)

    def _now(self) -> float:
        return round(time.monotonic() - self.t0, 4)

    def mark(self, name: str) -> None:
        self.marks[name] = self._now()

    def window_planned(self, w: Window) -> None:
        self._planned[(w.start, w.end)] = self._now()

    def window_done(self, index: int, w: Window, sent: float, result: WindowResult) -> None:
        self.windows.append(
            {
                "index": index,
                "start": round(w.start_seconds, 3),
                "seconds": round(w.seconds, 3),
                "planned": self._planned.get((w.start, w.end), 0.0),
                "sent": round(sent - self.t0, 4),
                "done": self._now(),
                "batch_size": result.batch_size,
            }
        )

    def summary(self) -> dict[str, object]:
        return {"marks": self.marks, "vad_seconds": round(self.vad_seconds, 3), "windows": self.windows}


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
        self,
        queue: JobQueue,
        transcribe: TranscribeFn,
        config: DispatcherConfig,
        spool: Spool | None = None,
        batch_capacity: Callable[[], int] | None = None,
        replicas: Callable[[], int] | None = None,
    ) -> None:
        self.queue = queue
        self.transcribe = transcribe
        # Planned windows are sent in groups of this many (or when planning ends), so the model
        # calls stay full: a lone first window costs as much as several batched ones on a CPU.
        self.batch_capacity = batch_capacity or (lambda: 8)
        # Transcriber replicas serving: the windows still held when planning ends are cut again so
        # each replica gets as many, of the same length (see WindowPlanner.balance).
        self.replicas = replicas or (lambda: 1)
        self.config = config
        self.spool = spool or Spool(
            config.spool_dir or os.path.join(tempfile.gettempdir(), "stt-spool"), name="dispatcher"
        )
        self._slots: list[asyncio.Task[None]] = []
        self._stopping = False
        self.active: dict[str, asyncio.Task[str]] = {}
        # Jobs whose work is making its final write (complete, fail): a heartbeat refused from then on
        # (the job ended, by that very write) must not cancel the write in flight.
        self._ending: Counter[str] = Counter()
        self._ended: set[str] = set()  # jobs this worker has ended (completed or failed) while running
        self.timelines: dict[str, JobTimeline] = {}  # the last jobs' timelines (the bench reads them)

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
            self._ended.discard(job.job_id)
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
            if lease.job_id in self._ended:
                return  # this worker ended the job: the lease ended with it (the work winds down)
            try:
                if await self.queue.heartbeat(lease):
                    if lease.job_id in self._ending:
                        continue  # the write in flight is refused (JOB_CANCELLED) or wins: see below
                    log.info("job was cancelled: stopping its work")
                    work.cancel()
                    return
                last_ok = time.monotonic()
            except (Aborted, NotFound) as exc:
                if lease.job_id in self._ending or lease.job_id in self._ended:
                    # Most likely that write ended the job (the work ends with it). If the lease was
                    # really lost, the write is refused too and says so; if the work goes on (an
                    # attempt charged to a chunk), the next heartbeat is refused again and stops it.
                    continue
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

    async def _end(self, lease: Lease, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """A write that may end the job (complete, fail, the attempt that fails it): while it is in
        flight the heartbeat does not cancel the work (see _heartbeat)."""
        self._ending[lease.job_id] += 1
        try:
            result = await self._persist(lease, what, call)
            if what != "fail chunk" or result:  # (fail_chunk: True when that attempt failed the job)
                self._ended.add(lease.job_id)
            return result
        finally:
            self._ending[lease.job_id] -= 1
            if self._ending[lease.job_id] <= 0:
                del self._ending[lease.job_id]

    async def _work(self, job: ClaimedJob, lease: Lease) -> str:
        spool = await asyncio.to_thread(self.spool.mkdtemp, f"job-{job.job_id}-")
        try:
            return await self._run(job, lease, spool)
        finally:
            shutil.rmtree(spool, ignore_errors=True)

    async def _run(self, job: ClaimedJob, lease: Lease, spool: str) -> str:
        timeline = JobTimeline(time.monotonic())
        self.timelines[job.job_id] = timeline
        while len(self.timelines) > 32:
            self.timelines.pop(next(iter(self.timelines)))
        source = os.path.join(spool, "source")
        fh = await asyncio.to_thread(open, source, "wb")
        try:
            async for piece in self.queue.read_audio(job.job_id):
                await asyncio.to_thread(fh.write, piece)
        finally:
            fh.close()
        timeline.mark("downloaded")
        pcm = PcmFile(os.path.join(spool, "pcm"))
        sem = asyncio.Semaphore(self.config.max_parallel_chunks)
        failed = asyncio.Event()
        plan: asyncio.Future[list[ChunkInfo]] = asyncio.get_running_loop().create_future()

        async def one(index: int, window: Window) -> None:
            await self._chunk(job, lease, pcm, index, window, failed, plan, timeline, sem)

        try:
            async with asyncio.TaskGroup() as tg:
                if job.chunks_total:  # resumed: the recorded plan, only what is missing
                    try:
                        await asyncio.to_thread(self._decode, job, source, pcm, None, timeline)
                    except (InvalidInput, LimitExceeded) as exc:
                        message = f"audio could not be decoded: {exc.message}"
                        await self._end(
                            lease, "fail", partial(self.queue.fail_job, lease, message, exc.reason)
                        )
                        return "failed"
                    chunks = await self._persist(lease, "plan", lambda: self.queue.chunks(job.job_id))
                    plan.set_result(chunks)
                    pending = [c for c in chunks if not c.completed]
                    log.info(
                        "transcribing %d of %d chunks (resumed after %d interruptions, %d attempts charged)",
                        len(pending), len(chunks), job.interruption_count, job.retry_count,
                    )  # fmt: skip
                    for c in pending:
                        w = Window(round(c.start * SAMPLE_RATE), round(c.end * SAMPLE_RATE))
                        tg.create_task(one(c.index, w))
                else:
                    chunks = await self._pipeline(job, lease, source, pcm, plan, tg, one, timeline, failed)
        except BaseExceptionGroup as group:
            leaf = first_leaf(group)
            if isinstance(leaf, _AudioFailed):
                return "failed"
            raise leaf from None
        finally:
            if not plan.done():
                plan.cancel()
            timeline.mark("transcribed")
        if failed.is_set():
            return "failed"
        if not chunks:  # no speech at all
            language = job.options.language or ""
            await self._end(lease, "complete", partial(self.queue.complete_job, lease, "", language))
            return "completed"
        final = await self._persist(lease, "chunks", lambda: self.queue.chunks(job.job_id))
        segments = [s for c in final for s in c.segments]
        languages = Counter(c.language for c in final if c.language)
        language = languages.most_common(1)[0][0] if languages else (job.options.language or "")
        transcript = join_text(segments)
        await self._end(lease, "complete", partial(self.queue.complete_job, lease, transcript, language))
        timeline.mark("completed")
        log.info("job timeline: %s", timeline.summary())
        return "completed"

    async def _pipeline(
        self,
        job: ClaimedJob,
        lease: Lease,
        source: str,
        pcm: PcmFile,
        plan: asyncio.Future[list[ChunkInfo]],
        tg: asyncio.TaskGroup,
        one: Callable[[int, Window], Coroutine[Any, Any, None]],
        timeline: JobTimeline,
        failed: asyncio.Event,
    ) -> list[ChunkInfo]:
        """Decode, find speech and plan windows in a thread while the windows already planned are
        transcribed; the windows still held when planning ends are cut again for the serving
        replicas (StreamingPlanner.balance). The plan is recorded once complete; a job interrupted
        before that plans again (the same way, or cut for the replicas serving then: no chunk is
        recorded before the plan is). Audio that fails to decode fails the job (_AudioFailed)."""
        loop = asyncio.get_running_loop()
        planned: asyncio.Queue[Window | None] = asyncio.Queue()
        stop = threading.Event()

        def emit(w: Window | None) -> None:
            loop.call_soon_threadsafe(planned.put_nowait, w)

        planner = StreamingPlanner(self.config.vad)

        def produce() -> None:
            try:
                self._decode(job, source, pcm, (planner, emit, stop), timeline)
            finally:
                emit(None)

        producer = asyncio.ensure_future(asyncio.to_thread(produce))
        windows: list[Window] = []
        groups: WindowGroups[tuple[int, Window]] = WindowGroups(self.batch_capacity)
        try:
            while (w := await planned.get()) is not None:
                for i, g in groups.add((len(windows), w)):
                    tg.create_task(one(i, g))
                windows.append(w)
            await producer
            held = groups.finish()  # the last windows planned, none sent yet
            tail = [w for _, w in held]
            again = planner.balance(tail, self.replicas())
            if again != tail:
                base = len(windows) - len(tail)
                windows[base:] = again
                held = list(enumerate(again, base))
                for w in again:
                    timeline.window_planned(w)
            for i, g in held:
                tg.create_task(one(i, g))
        except (InvalidInput, LimitExceeded) as exc:
            stop.set()
            message = f"audio could not be decoded: {exc.message}"
            await self._end(lease, "fail", partial(self.queue.fail_job, lease, message, exc.reason))
            raise _AudioFailed() from None
        finally:
            stop.set()
            if not producer.done():
                await asyncio.gather(producer, return_exceptions=True)
        if not windows or failed.is_set():  # (a chunk has failed the job: no plan to record)
            plan.set_result([])
            return []
        spans = [(w.start_seconds, w.end_seconds) for w in windows]
        try:
            chunks = await self._persist(lease, "plan", lambda: self.queue.set_plan(lease, spans))
        except (Aborted, NotFound):
            if failed.is_set():  # refused: a chunk failed the job meanwhile
                plan.set_result([])
                return []
            raise
        plan.set_result(chunks)
        timeline.mark("plan recorded")
        return chunks

    def _decode(
        self,
        job: ClaimedJob,
        source: str,
        pcm: PcmFile,
        plan: tuple[StreamingPlanner, Callable[[Window | None], None], threading.Event] | None,
        timeline: JobTimeline,
    ) -> None:
        """(Thread) The job's audio into `pcm` (16-bit), once; with `plan` (planner, emit, stop),
        windows are planned as the audio arrives and handed out as soon as each is settled (and on
        disk)."""
        planner, emit, stop = plan if plan else (None, None, None)
        with open(pcm.path, "wb") as out:
            for block in iter_source(
                source,
                limits=self.config.limits,
                encoding=job.encoding,
                sample_rate=job.sample_rate,
                channels=job.channels,
            ):
                data = to_pcm16(block)
                out.write(data)
                if planner is None or emit is None or stop is None:
                    continue
                if stop.is_set():
                    return
                windows = planner.feed(from_pcm16(data))
                if windows:
                    out.flush()
                    for w in windows:
                        timeline.window_planned(w)
                        emit(w)
            out.flush()
            timeline.mark("decoded")
            if planner is not None and emit is not None:
                for w in planner.finish():
                    timeline.window_planned(w)
                    emit(w)
                timeline.vad_seconds = planner.vad_seconds
                timeline.mark("planned")
                memory.trim()  # what decoding and VAD (on their own threads) freed
                emit(None)

    async def _chunk(
        self,
        job: ClaimedJob,
        lease: Lease,
        pcm: PcmFile,
        index: int,
        window: Window,
        failed: asyncio.Event,
        plan: asyncio.Future[list[ChunkInfo]],
        timeline: JobTimeline,
        sem: asyncio.Semaphore,
    ) -> None:
        """One window: transcribed (at most max_parallel_chunks at once), then recorded once the
        plan is (a finished window waiting for the plan holds no slot)."""
        seconds = round(window.seconds, 3)
        waits = Backoff(self.config.capacity_retry_seconds, self.config.max_capacity_retry_seconds)
        while not failed.is_set():
            try:
                async with sem:
                    if failed.is_set():
                        return  # another chunk failed the job while this one waited for a slot
                    # A window is ~1 MB, read at once: the group's windows reach the model together.
                    # (Its samples are not kept here: the pool holds only the request it makes.)
                    sent = time.monotonic()
                    result = await tracing.traced(
                        "job.chunk",
                        self.transcribe(
                            from_pcm16(pcm.read(window.start, window.end)), job.options, WorkClass.BATCH
                        ),
                        {"stt.chunk_index": index, "stt.audio_seconds": seconds},
                    )
            except InvalidInput as exc:
                # The request itself is wrong (e.g. a language the model cannot do): no retry helps.
                CHUNKS.labels("invalid").inc()
                if failed.is_set():
                    return  # another chunk has failed the job already
                failed.set()
                message = f"chunk {index}: {exc.message}"
                await self._end(lease, "fail", partial(self.queue.fail_job, lease, message, exc.reason))
                return
            except ServiceError as exc:
                if exc.reason in NOT_THE_JOBS_FAULT:
                    CHUNKS.labels("waiting").inc()
                    wait = waits.next()
                    log.warning(
                        "chunk %d waits for capacity (%s); retrying in %.1fs", index, exc.message, wait
                    )
                    await asyncio.sleep(wait)
                    continue
                CHUNKS.labels("error").inc()
                log.warning("chunk %d failed: %s", index, exc.message)
                if failed.is_set():
                    return  # the job has failed meanwhile: no attempt to charge
                await plan  # an attempt is charged to a recorded chunk
                if await self._end(
                    lease, "fail chunk", partial(self.queue.fail_chunk, lease, index, exc.message, exc.reason)
                ):
                    failed.set()
                    return
                await asyncio.sleep(self.config.chunk_retry_seconds)
                continue
            timeline.window_done(index, window, sent, result)
            if failed.is_set():
                return  # another chunk failed the job while this one was transcribed
            await plan  # results are recorded against the recorded plan
            segments: list[Segment] = merge([window], [result.segments])
            try:
                await self._persist(
                    lease,
                    f"chunk {index}",
                    partial(self.queue.complete_chunk, lease, index, segments, result.language),
                )
            except (Aborted, NotFound):
                if failed.is_set() or lease.job_id in self._ending:
                    # Refused because another chunk failed the job meanwhile (its write may still be
                    # on its way: if that one is refused too, it says why).
                    return
                raise
            CHUNKS.labels("ok").inc()
            return
