"""Gathers concurrent windows into batched model calls; live windows go first.

Callers `await submit(...)`. Worker tasks wait for work, take up to `max_batch` windows in priority
order (LIVE > INTERACTIVE > BATCH, then arrival) and run one model call in a thread; windows that
queue meanwhile form the next call. A full call of batch work also takes the last few batch windows
queued (at most `fold_allowance(max_batch)`) when nothing else waits. When batch work (job chunks)
is first in line, the worker gives the rest of its burst `window_ms` to arrive. Live streams move in
ticks: every stream whose hypothesis came back from a call sends its next window at once, so after a
call the worker expects the live windows already waiting plus those of the call just made, and
gives them up to `live_gather_ms` to arrive: all streams share one call per tick (without this they split into
cohorts that alternate, each call half full). With several workers on a CPU (calls side by side,
`share_live`), a tick's live windows are shared out among the idle workers, and a worker takes live
windows while another call runs (a stream's hypothesis does not wait behind a job's call); other
work runs in one call at a time (beside live calls too), as with one worker (two calls of 30 s
windows at once would only raise the memory peak). On a GPU every worker takes any work. A caller
that goes away before its window is picked costs nothing.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from prometheus_client import Counter, Gauge, Histogram

from services.shared import tracing
from services.shared.domain import SAMPLE_RATE, WindowResult, WorkClass, fold_allowance
from services.shared.errors import Unavailable
from services.transcriber.engine import WindowRequest

log = logging.getLogger("transcriber.batcher")

BATCH_SIZE = Histogram(
    "stt_transcriber_batch_size", "Windows per model call", buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
)
QUEUE_DEPTH = Gauge("stt_transcriber_queue_depth", "Windows waiting for the model", ["work_class"])
RTF = Histogram(
    "stt_transcriber_real_time_factor",
    "Model seconds per audio second, per model call",
    buckets=(0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 5),
)
AUDIO_SECONDS = Counter("stt_transcriber_audio_seconds_total", "Audio seconds transcribed", ["work_class"])
WAIT_SECONDS = Histogram(
    "stt_transcriber_queue_wait_seconds",
    "Time a window waited before its model call",
    ["work_class"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
BUSY_SECONDS = Counter(
    "stt_transcriber_model_busy_seconds_total",
    "Seconds model calls ran (summed over workers): busy ratio = rate / stt_transcriber_model_workers",
)
WORKERS = Gauge(
    "stt_transcriber_model_workers", "Model calls this transcriber runs at once (STT_NUM_WORKERS)"
)


@dataclass(order=True)
class _Item:
    sort_key: tuple[int, int]
    req: WindowRequest = field(compare=False)
    work_class: WorkClass = field(compare=False)
    future: asyncio.Future[WindowResult] = field(compare=False)
    enqueued: float = field(compare=False, default_factory=time.perf_counter)
    # Set by the worker before the future resolves (for the window's trace spans).
    started: float = field(compare=False, default=0.0)
    finished: float = field(compare=False, default=0.0)
    batch_size: int = field(compare=False, default=0)


class Batcher:
    def __init__(
        self,
        run_batch: Callable[[list[WindowRequest]], list[WindowResult | BaseException]],
        *,
        window_ms: float,
        max_batch: int,
        max_queue: int,
        workers: int = 1,
        live_gather_ms: float = 40.0,
        share_live: bool = True,
    ) -> None:
        self._run_batch = run_batch
        self._window = max(window_ms, 0.0) / 1000.0
        self._max_batch = max(1, max_batch)
        self._max_queue = max_queue
        self._live_gather = max(live_gather_ms, 0.0) / 1000.0
        # Several workers share a tick's live windows out, and beside a running call take only live
        # windows (a CPU's calls side by side; on a GPU one call of many windows is cheaper, and
        # workers take any work, as many as max_batch).
        self._share_live = share_live
        self._expect_live = 0  # live windows expected for the next call (see _gather_live)
        self._heap: list[_Item] = []
        self._seq = itertools.count()
        self._wakeup = asyncio.Event()
        self._workers = max(1, workers)
        WORKERS.set(self._workers)
        self._executor = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="model")
        self._tasks: list[asyncio.Task[None]] = []
        # One worker at a time gathers and takes its batch (see _worker).
        self._taking = asyncio.Lock()
        self._closed = False
        self.busy = 0  # model calls running now
        self._other_busy = 0  # of them, calls holding windows that are not live
        self.calls = 0  # model calls made

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._worker(i), name=f"batcher-{i}") for i in range(self._workers)
        ]

    async def close(self) -> None:
        self._closed = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        _shutting_down(self._heap)
        for item in self._heap:
            QUEUE_DEPTH.labels(item.work_class.name).dec()
        self._heap.clear()
        # The calls still running finish in their threads (CTranslate2 cannot be interrupted); the
        # event loop goes on meanwhile.
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)

    @property
    def pending(self) -> int:
        return len(self._heap)

    async def submit(self, req: WindowRequest, work_class: WorkClass) -> WindowResult:
        if self._closed:
            raise Unavailable("transcriber is shutting down", reason="DRAINING")
        if len(self._heap) >= self._max_queue:
            raise Unavailable(
                f"transcriber queue is full ({self._max_queue} windows waiting)",
                reason="QUEUE_FULL",
                retry_after_seconds=0.5,
            )
        fut: asyncio.Future[WindowResult] = asyncio.get_running_loop().create_future()
        req.abandoned = fut.done  # (cancelled when the caller goes away: see the finally below)
        item = _Item((-int(work_class), next(self._seq)), req, work_class, fut)
        heapq.heappush(self._heap, item)
        QUEUE_DEPTH.labels(work_class.name).inc()
        self._wakeup.set()
        try:
            return await fut
        finally:
            if not fut.done():
                fut.cancel()  # the caller went away: the worker skips this window
            _trace(item)

    def _take(self) -> list[_Item]:
        batch: list[_Item] = []
        limit = self._max_batch
        idle = self._workers - self.busy  # this worker included
        live = self._live_waiting()  # (a cancelled live window at the head is not live work)
        if self._share_live and idle > 1 and live:
            # Live windows are shared out among the idle workers: calls side by side finish a tick
            # sooner than one call of all of them (a tiny model's greedy decoding keeps two threads
            # only half busy; on 2 cores, 8 live windows of 2.3 s: one call 0.33-0.54 s, two calls
            # of 4 at once 0.22-0.30 s).
            limit = min(limit, -(-live // idle))
        while self._heap and len(batch) < limit:
            if self._share_live and self._other_busy and self._heap[0].work_class != WorkClass.LIVE:
                break  # beside a call of other work: live windows only
            item = heapq.heappop(self._heap)
            QUEUE_DEPTH.labels(item.work_class.name).dec()
            if not item.future.done():
                batch.append(item)
            if len(batch) == self._max_batch and batch[0].work_class == WorkClass.BATCH:
                # A full call of batch work: if the little that is left is batch work too, it goes
                # along rather than alone in a nearly empty call of its own (fold_allowance).
                rest = [i for i in self._heap if not i.future.done()]
                if 0 < len(rest) <= fold_allowance(self._max_batch):
                    limit = self._max_batch + len(rest)
        return batch

    async def _worker(self, index: int) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._ready():
                self._wakeup.clear()
                await self._wakeup.wait()
            async with self._taking:  # another worker may have taken it meanwhile
                if not self._ready():
                    continue
                head = self._heap[0].work_class
                full = self._max_batch + fold_allowance(self._max_batch)
                if head == WorkClass.BATCH and len(self._heap) < full and self._window > 0:
                    # Batch work (a job's chunks arrive as a burst) waits for the rest of the burst:
                    # until no window arrived for window_ms (at most 5 x window_ms), so its last
                    # windows can go along (see _take); live and interactive windows never wait.
                    waited = 0.0
                    while len(self._heap) < full and waited < 5 * self._window:
                        queued = len(self._heap)
                        await asyncio.sleep(self._window)
                        waited += self._window
                        if len(self._heap) == queued or self._heap[0].work_class != WorkClass.BATCH:
                            break
                elif head == WorkClass.LIVE and self._live_gather > 0:
                    await self._gather_live()
                if not self._ready():
                    continue
                batch = self._take()
                if not batch:
                    continue
                self.busy += 1
                live = sum(1 for i in batch if i.work_class == WorkClass.LIVE)
                other = live < len(batch)
                self._other_busy += other
            now = time.perf_counter()
            for item in batch:
                WAIT_SECONDS.labels(item.work_class.name).observe(now - item.enqueued)
            BATCH_SIZE.observe(len(batch))
            self.calls += 1
            try:
                results = await loop.run_in_executor(self._executor, self._run_batch, [i.req for i in batch])
            except asyncio.CancelledError:  # close(): the call's callers are answered, not left waiting
                _shutting_down(batch)
                raise
            except Exception as exc:  # the whole call failed
                results = [exc] * len(batch)
            finally:
                self.busy -= 1
                self._other_busy -= other
                self._wakeup.set()  # work that waited for this call (see _ready)
            finished = time.perf_counter()
            elapsed = finished - now
            # The streams of this call come back at once; those still queued wait with them.
            self._expect_live = min(live + self._live_waiting(), self._max_batch)
            BUSY_SECONDS.inc(elapsed)
            audio = sum(i.req.audio.shape[0] for i in batch) / SAMPLE_RATE
            if audio > 0:
                RTF.observe(elapsed / audio)
            per_class = collections.Counter(i.work_class for i in batch)
            for item, res in zip(batch, results, strict=True):
                item.started, item.finished, item.batch_size = now, finished, len(batch)
                AUDIO_SECONDS.labels(item.work_class.name).inc(item.req.audio.shape[0] / SAMPLE_RATE)
                if item.future.done():
                    continue
                if isinstance(res, BaseException):
                    item.future.set_exception(res)
                else:
                    # The call's windows of this window's class (the engine counted its group only:
                    # windows of another beam or context in the call are decoded apart), and the
                    # call's seconds: the gateway fits the cost of a live call from them (job
                    # windows in a live call only lengthen the seconds: the estimate errs safe).
                    res.batch_size = per_class[item.work_class]
                    res.model_seconds = round(elapsed, 4)
                    res.model_workers = self._workers
                    item.future.set_result(res)

    def _ready(self) -> bool:
        """Whether an idle worker has work to take: any, or only live windows while a call of other
        work runs (beside live calls other work may run: with live windows always first in line and
        calls drifting apart, waiting for no call at all kept a job's windows waiting for good)."""
        if not self._share_live:
            return bool(self._heap)
        return bool(self._heap) and (self._other_busy == 0 or self._live_waiting() > 0)

    def _live_waiting(self) -> int:
        return sum(1 for i in self._heap if i.work_class == WorkClass.LIVE and not i.future.done())

    async def _gather_live(self) -> None:
        """Wait (at most live_gather_ms) until the live windows expected for this tick are queued."""
        want, self._expect_live = self._expect_live, 0
        deadline = time.perf_counter() + self._live_gather
        while self._live_waiting() < want:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return


def _shutting_down(items: list[_Item]) -> None:
    for item in items:
        if not item.future.done():
            item.future.set_exception(Unavailable("transcriber is shutting down", reason="DRAINING"))


def _trace(item: _Item) -> None:
    """The window's time in the queue and in its model call, as spans of the caller's trace."""
    if not tracing.enabled() or not item.finished:
        return
    attributes = {
        "stt.work_class": item.work_class.name,
        "stt.audio_seconds": round(item.req.audio.shape[0] / SAMPLE_RATE, 3),
        "stt.batch_size": item.batch_size,
        "stt.queue_wait_seconds": round(item.started - item.enqueued, 4),
        "stt.model_seconds": round(item.finished - item.started, 4),
    }
    tracing.record("transcriber.queue", item.enqueued, item.started, attributes)
    tracing.record("transcriber.model", item.started, item.finished, attributes)
