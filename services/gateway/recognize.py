"""Recognition of a whole recording: VAD windows -> transcriber pool in parallel -> merged result.
No grpc here: the transcriber is any async callable."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from services.gateway.chunking import VadSettings, Window, merge, plan_windows, speech_regions
from services.shared.domain import (
    MAX_WINDOW_SECONDS,
    SAMPLE_RATE,
    DecodeOptions,
    Segment,
    WindowResult,
    WorkClass,
)

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
        # model and only decides whether there is any speech at all (no words invented on silence).
        regions_task = asyncio.create_task(asyncio.to_thread(speech_regions, audio, vad))
        try:
            result = await transcribe(audio, options, work_class)
        finally:
            regions = await regions_task
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
    return Recognition(
        segments=merge(windows, [r.segments for r in results]),
        language=majority_language(results, options.language or ""),
        duration=duration,
        windows=windows,
        model=next((r.model for r in results if r.model), ""),
    )
