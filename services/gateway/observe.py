"""What the gateway measures and traces about jobs and live streams, kept out of the domain code
(the dispatcher and the speech API call these helpers at their seams). No grpc here.

Streams: the final-word latency is the time from the arrival of the audio holding a word's end to the
moment the final result holding the word is sent (the server's view of what bench/m_stream.py
measures at the client); the real-time factor is the model time a stream used per second of its audio.
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from prometheus_client import Counter, Histogram

from services.gateway.jobqueue import ClaimedJob
from services.shared import tracing
from services.shared.domain import SAMPLE_RATE, DecodeOptions, WindowResult, Word, WorkClass

TranscribeFn = Callable[[np.ndarray, DecodeOptions, WorkClass], Awaitable[WindowResult]]

FINAL_WORD_LATENCY = Histogram(
    "stt_stream_final_word_latency_seconds",
    "Time from the arrival of a word's audio to the final result holding the word",
    buckets=(0.1, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 2, 2.5, 3, 4, 5, 7.5, 10, 20),
)
STREAM_RTF = Histogram(
    "stt_stream_real_time_factor",
    "Seconds of transcriber calls a live stream made per second of its audio (at the stream's end)",
    buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5),
)
STREAM_AUDIO = Counter("stt_stream_audio_seconds_total", "Audio seconds received by live streams")
STREAM_FINALS = Counter("stt_stream_final_results_total", "Final results sent to live streams")

# Arrival marks kept per stream: a word is finalised at most a window (and the backlog) after its audio.
_MARK_HORIZON_SECONDS = 180.0


# -- jobs ---------------------------------------------------------------------------------------------


def job_started(job: ClaimedJob, worker_id: str) -> Any:
    """The span of this attempt at the job ("job.run"), continuing the trace stored with the job.
    The first attempt also records the job's time in the queue ("job.queued")."""
    if not tracing.enabled():
        return tracing.NO_SPAN
    attributes = {
        "stt.job_id": job.job_id,
        "stt.priority": job.priority or None,
        # The n-th run of the job: every claim raises the lease epoch, whatever ended the previous run
        # (a charged failure, an interruption, a restart or a drain).
        "stt.attempt": job.epoch,
        "stt.attempts_charged": job.retry_count,
        "stt.worker_id": worker_id,
        "stt.lease_epoch": job.epoch,
        "stt.chunks_total": job.chunks_total or None,
    }
    if job.retry_count + job.interruption_count == 0 and not job.chunks_total and job.created_at:
        wait = max(0.0, time.time() - job.created_at)
        queued = tracing.start_from(
            job.trace_parent,
            "job.queued",
            {**attributes, "stt.queue_wait_seconds": round(wait, 3)},
            start_time=job.created_at,
        )
        tracing.end(queued)
    return tracing.start_from(job.trace_parent, "job.run", attributes)


# -- streams --------------------------------------------------------------------------------------------


class StreamObserver:
    """One live stream: when its audio arrived, how long its model calls took, its finals."""

    def __init__(self) -> None:
        self._seconds: deque[float] = deque()  # stream seconds received ...
        self._times: deque[float] = deque()  # ... and the monotonic time they had arrived
        self.model_seconds = 0.0
        self.received_seconds = 0.0

    def arrived(self, received_seconds: float) -> None:
        """The stream has now received this many seconds of audio."""
        STREAM_AUDIO.inc(max(0.0, received_seconds - self.received_seconds))
        self.received_seconds = received_seconds
        now = time.monotonic()
        self._seconds.append(received_seconds)
        self._times.append(now)
        while self._seconds and self._seconds[0] < received_seconds - _MARK_HORIZON_SECONDS:
            self._seconds.popleft()
            self._times.popleft()

    def arrival(self, stream_seconds: float) -> float | None:
        """Monotonic time at which the audio up to `stream_seconds` had arrived."""
        if not self._seconds:
            return None
        i = bisect.bisect_left(self._seconds, stream_seconds - 1e-6)
        return self._times[min(i, len(self._times) - 1)]

    def final(self, words: list[Word], start: float, end: float) -> None:
        """A final result is being sent: observe each word's latency, and trace it."""
        now = time.monotonic()
        latencies = []
        for w in words:
            t = self.arrival(w.end)
            if t is not None:
                latencies.append(max(0.0, now - t))
                FINAL_WORD_LATENCY.observe(latencies[-1])
        STREAM_FINALS.inc()
        if tracing.enabled() and latencies:
            perf = time.perf_counter()  # the span: from the last word's audio to this result
            tracing.record(
                "stream.final",
                perf - latencies[-1],
                perf,
                {
                    "stt.words": len(words),
                    "stt.audio_start_seconds": round(start, 3),
                    "stt.audio_end_seconds": round(end, 3),
                    "stt.final_word_latency_seconds": round(latencies[-1], 3),
                },
            )

    def transcribe(self, fn: TranscribeFn) -> TranscribeFn:
        """fn, timed (for the real-time factor) and traced as one hypothesis ("stream.hypothesis")."""

        async def call(audio: np.ndarray, options: DecodeOptions, work_class: WorkClass) -> WindowResult:
            t0 = time.perf_counter()
            try:
                if not tracing.enabled():
                    return await fn(audio, options, work_class)
                with tracing.span("stream.hypothesis", {"stt.audio_seconds": audio.shape[0] / SAMPLE_RATE}):
                    return await fn(audio, options, work_class)
            finally:
                self.model_seconds += time.perf_counter() - t0

        return call

    def closed(self) -> None:
        if self.received_seconds > 0:
            STREAM_RTF.observe(self.model_seconds / self.received_seconds)
