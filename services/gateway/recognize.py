"""Recognition of a whole recording: VAD windows -> transcriber pool in parallel -> merged result.
No grpc here: the transcriber is any async callable."""

from __future__ import annotations

import asyncio
import bisect
import threading
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.gateway.chunking import (
    StreamingPlanner,
    VadSettings,
    Window,
    WindowGroups,
    merge,
    plan_windows,
    speech_regions,
)
from services.shared.domain import (
    MAX_WINDOW_SECONDS,
    SAMPLE_RATE,
    DecodeOptions,
    Segment,
    WindowResult,
    WorkClass,
)
from services.shared.pcm import from_pcm16, pcm16_array

TranscribeFn = Callable[[np.ndarray, DecodeOptions, WorkClass], Awaitable[WindowResult]]


@dataclass(slots=True)
class Recognition:
    segments: list[Segment]
    language: str
    duration: float
    windows: list[Window]
    model: str = ""


async def plan(audio: np.ndarray, vad: VadSettings) -> list[Window]:
    """Windows of at most 30 s cut at pauses (VAD runs in a thread)."""
    regions = await asyncio.to_thread(speech_regions, audio, vad)
    return plan_windows(audio, regions)


async def transcribe_windows(
    audio: np.ndarray,
    windows: list[Window],
    transcribe: TranscribeFn,
    options: DecodeOptions,
    work_class: WorkClass,
    *,
    max_parallel: int,
) -> list[WindowResult]:
    """All windows through the pool, at most max_parallel at once; the first failure cancels the rest."""
    sem = asyncio.Semaphore(max(1, max_parallel))

    async def one(w: Window) -> WindowResult:
        async with sem:
            return await transcribe(audio[w.start : w.end], options, work_class)

    try:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(one(w)) for w in windows]
    except BaseExceptionGroup as group:
        raise first_leaf(group) from None
    return [t.result() for t in tasks]


def first_leaf(group: BaseExceptionGroup) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def majority_language(results: list[WindowResult], default: str) -> str:
    langs = Counter(r.language for r in results if r.language)
    return langs.most_common(1)[0][0] if langs else default


class SampleStore:
    """Decoded audio kept as 16-bit blocks (half the memory of float32; the transcriber hop carries
    16-bit anyway), sliced a window at a time."""

    def __init__(self) -> None:
        self._blocks: list[np.ndarray] = []
        self._starts: list[int] = []
        self.total = 0

    def append(self, samples: np.ndarray) -> None:
        if samples.shape[0]:
            self._blocks.append(pcm16_array(samples))
            self._starts.append(self.total)
            self.total += samples.shape[0]

    @property
    def nbytes(self) -> int:
        return 2 * self.total

    def read(self, start: int, end: int) -> np.ndarray:
        i = max(0, bisect.bisect_right(self._starts, start) - 1)
        parts = []
        while i < len(self._blocks) and self._starts[i] < end:
            b0 = self._starts[i]
            parts.append(self._blocks[i][max(0, start - b0) : max(0, end - b0)])
            i += 1
        return from_pcm16(np.concatenate(parts) if parts else np.zeros(0, dtype="<i2"))

    def all(self) -> np.ndarray:
        return self.read(0, self.total)


async def recognize_blocks(
    blocks: Callable[[], Iterator[np.ndarray]],
    transcribe: TranscribeFn,
    options: DecodeOptions,
    *,
    vad: VadSettings,
    max_parallel: int,
    work_class: WorkClass = WorkClass.INTERACTIVE,
    on_decoded: Callable[[SampleStore], None] | None = None,
    group: Callable[[], int] = lambda: 8,
    replicas: Callable[[], int] = lambda: 1,
) -> Recognition:
    """Recognition while decoding: `blocks` (run in a thread) yields the decoded audio; once it is
    longer than one window, VAD and window planning follow the decoder and each settled window
    goes to the pool in groups of `group()` windows (full model calls; see WindowGroups); those
    still held when planning ends are cut again so each of `replicas()` transcribers gets as many
    of the same length (WindowPlanner.balance). Audio that fits in one window is recognized as
    `recognize` does."""
    loop = asyncio.get_running_loop()
    store = SampleStore()
    planned: asyncio.Queue[Window | None] = asyncio.Queue()
    stop = threading.Event()
    limit = int(MAX_WINDOW_SECONDS * SAMPLE_RATE)
    burst_class = WorkClass.BATCH if work_class == WorkClass.INTERACTIVE else work_class

    planner = StreamingPlanner(vad)

    def produce() -> None:
        try:
            for block in blocks():
                store.append(block)
                for w in planner.feed(block):
                    loop.call_soon_threadsafe(planned.put_nowait, w)
                if stop.is_set():
                    return
            if store.total > limit:
                for w in planner.finish():
                    loop.call_soon_threadsafe(planned.put_nowait, w)
        finally:
            loop.call_soon_threadsafe(planned.put_nowait, None)

    sem = asyncio.Semaphore(max(1, max_parallel))

    async def one(w: Window) -> WindowResult:
        async with sem:
            # The windows of long audio come as a burst: as batch work they may wait a moment for
            # each other and share model calls (interactive windows never wait for company).
            return await transcribe(store.read(w.start, w.end), options, burst_class)

    producer = asyncio.ensure_future(asyncio.to_thread(produce))
    windows: list[Window] = []
    tasks: list[asyncio.Task[WindowResult]] = []
    try:
        async with asyncio.TaskGroup() as tg:
            groups: WindowGroups[Window] = WindowGroups(group)
            while (w := await planned.get()) is not None:
                windows.append(w)
                tasks += [tg.create_task(one(h)) for h in groups.add(w)]
            await producer
            tail = groups.finish()  # the last windows planned, none sent yet
            again = planner.balance(tail, replicas())
            windows[len(windows) - len(tail) :] = again
            tasks += [tg.create_task(one(h)) for h in again]
            if on_decoded is not None:
                on_decoded(store)
    except BaseExceptionGroup as group:
        raise first_leaf(group) from None
    finally:
        stop.set()
        if not producer.done():
            await asyncio.gather(producer, return_exceptions=True)
    duration = store.total / SAMPLE_RATE
    if store.total <= limit:
        return await recognize(
            store.all(), transcribe, options, vad=vad, max_parallel=max_parallel, work_class=work_class
        )
    return _joined(windows, [t.result() for t in tasks], options, duration)


async def recognize(
    audio: np.ndarray,
    transcribe: TranscribeFn,
    options: DecodeOptions,
    *,
    vad: VadSettings,
    max_parallel: int,
    work_class: WorkClass = WorkClass.INTERACTIVE,
) -> Recognition:
    duration = audio.shape[0] / SAMPLE_RATE
    if duration <= MAX_WINDOW_SECONDS:
        # One window, the whole audio (as plain faster-whisper would see it). VAD runs alongside the
        # model and only decides whether there is any speech at all (no words invented on silence);
        # when it finds none first, the model call is cancelled (noise or a tone can make the model
        # loop at every fallback temperature: seconds of model time for nothing).
        regions_task = asyncio.create_task(asyncio.to_thread(speech_regions, audio, vad))
        model_task: asyncio.Future[WindowResult] = asyncio.ensure_future(
            transcribe(audio, options, work_class)
        )
        try:
            first: list[asyncio.Future[Any]] = [regions_task, model_task]
            await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
            if regions_task.done() and not regions_task.exception() and not regions_task.result():
                model_task.cancel()
                await asyncio.gather(model_task, return_exceptions=True)
                return Recognition([], options.language or "", duration, [], "")
            result = await model_task
        finally:
            if not model_task.done():  # (the caller went away)
                model_task.cancel()
                await asyncio.gather(model_task, return_exceptions=True)
            regions = (await asyncio.gather(regions_task, return_exceptions=True))[0]
        if isinstance(regions, BaseException):
            raise regions
        if not regions:
            return Recognition([], options.language or result.language, duration, [], result.model)
        windows = [Window(0, audio.shape[0])]
        return Recognition(
            merge(windows, [result.segments]), result.language, duration, windows, result.model
        )
    windows = await plan(audio, vad)
    results = await transcribe_windows(
        audio, windows, transcribe, options, work_class, max_parallel=max_parallel
    )
    return _joined(windows, results, options, duration)


def _joined(
    windows: list[Window], results: list[WindowResult], options: DecodeOptions, duration: float
) -> Recognition:
    """One recognition from the results of its windows."""
    return Recognition(
        segments=merge(windows, [r.segments for r in results]),
        language=majority_language(results, options.language or ""),
        duration=duration,
        windows=windows,
        model=next((r.model for r in results if r.model), ""),
    )
