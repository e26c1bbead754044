"""Cut audio at pauses into windows of at most 30 s, and merge window results back. No grpc.

Windows are cut in the middle of the pauses Silero VAD finds, so no word is split; stretches
without speech are skipped (no invented words on silence). A single stretch of speech longer than
the maximum is cut at its quietest point.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.shared.domain import MAX_WINDOW_SECONDS, SAMPLE_RATE, Segment, Word
from services.shared.pcm import from_pcm16


@dataclass(frozen=True, slots=True)
class Window:
    start: int  # samples
    end: int

    @property
    def start_seconds(self) -> float:
        return self.start / SAMPLE_RATE

    @property
    def end_seconds(self) -> float:
        return self.end / SAMPLE_RATE

    @property
    def seconds(self) -> float:
        return (self.end - self.start) / SAMPLE_RATE


@dataclass(frozen=True, slots=True)
class VadSettings:
    threshold: float = 0.35
    min_silence_ms: int = 300
    speech_pad_ms: int = 200
    min_speech_ms: int = 150


def speech_regions(audio: np.ndarray, vad: VadSettings) -> list[tuple[int, int]]:
    """[(start, end)] sample ranges that contain speech, per Silero VAD."""
    from faster_whisper.vad import VadOptions, get_speech_timestamps

    if audio.shape[0] == 0:
        return []
    stamps = get_speech_timestamps(
        audio,
        VadOptions(
            threshold=vad.threshold,
            min_silence_duration_ms=vad.min_silence_ms,
            speech_pad_ms=vad.speech_pad_ms,
            min_speech_duration_ms=vad.min_speech_ms,
        ),
    )
    return [(int(s["start"]), int(s["end"])) for s in stamps]


def speech_regions_long(
    pcm: np.ndarray, vad: VadSettings, *, block_seconds: float = 600.0
) -> list[tuple[int, int]]:
    """Speech regions of long int16 audio (e.g. a memory-mapped file), one block at a time so
    memory stays bounded; regions that meet at a block boundary are joined."""
    block = int(block_seconds * SAMPLE_RATE)
    out: list[tuple[int, int]] = []
    for offset in range(0, pcm.shape[0], block):
        audio = from_pcm16(pcm[offset : offset + block])
        for start, end in speech_regions(audio, vad):
            start, end = start + offset, end + offset
            if out and start - out[-1][1] <= SAMPLE_RATE // 10 and start - offset <= SAMPLE_RATE // 2:
                out[-1] = (out[-1][0], end)
            else:
                out.append((start, end))
    return out


def _quietest_cut(audio: np.ndarray, lo: int, hi: int) -> int:
    """Sample index of the quietest 50 ms frame between lo and hi."""
    frame = SAMPLE_RATE // 20
    if hi - lo <= frame:
        return hi
    seg = np.asarray(audio[lo:hi], dtype=np.float32)
    n = seg.shape[0] // frame
    energy = np.square(seg[: n * frame].reshape(n, frame)).mean(axis=1)
    return lo + int(np.argmin(energy)) * frame + frame // 2


def plan_windows(
    audio: np.ndarray,
    regions: list[tuple[int, int]],
    *,
    max_seconds: float = MAX_WINDOW_SECONDS,
) -> list[Window]:
    """Group speech regions into windows of at most max_seconds, cut in the pauses between them."""
    limit = int(max_seconds * SAMPLE_RATE)
    total = audio.shape[0]
    if regions and total <= limit:
        return [Window(0, total)]  # it all fits: the whole audio, as the model would see a file
    # Split regions longer than the limit at their quietest point (searching its last half).
    pieces: list[tuple[int, int]] = []
    for start, end in regions:
        start, end = max(0, start), min(total, end)
        while end - start > limit:
            cut = _quietest_cut(audio, start + limit // 2, start + limit)
            pieces.append((start, cut))
            start = cut
        if end > start:
            pieces.append((start, end))
    windows: list[Window] = []
    i = 0
    while i < len(pieces):
        w_start, w_end = pieces[i]
        j = i + 1
        while j < len(pieces) and pieces[j][1] - w_start <= limit:
            w_end = pieces[j][1]
            j += 1
        windows.append(Window(w_start, w_end))
        i = j
    # Widen each window into half of the pause on either side, up to 1 s (the model does better
    # with some silence around speech), keeping windows disjoint and within the limit.
    out: list[Window] = []
    for k, w in enumerate(windows):
        prev_end = windows[k - 1].end if k else 0
        next_start = windows[k + 1].start if k + 1 < len(windows) else total
        lo = max(prev_end + (w.start - prev_end) // 2, w.start - SAMPLE_RATE)
        hi = min(w.end + (next_start - w.end) // 2, w.end + SAMPLE_RATE)
        slack = limit - (w.end - w.start)
        lo = max(lo, w.start - slack // 2)
        hi = min(hi, w.end + (slack - (w.start - lo)))
        out.append(Window(max(0, lo), min(total, hi)))
    return out


def merge(windows: list[Window], results: list[list[Segment]]) -> list[Segment]:
    """Shift each window's segments to whole-audio time; keep times monotonic and inside windows."""
    merged: list[Segment] = []
    last = 0.0
    for window, segments in zip(windows, results, strict=True):
        lo, hi = window.start_seconds, window.end_seconds
        for seg in sorted(segments, key=lambda s: s.start):
            s = seg.shifted(lo)
            words: list[Word] = []
            for w in s.words:
                start = min(max(w.start, last, lo), hi)
                end = min(max(w.end, start), hi)
                words.append(Word(w.word, round(start, 3), round(end, 3), w.probability))
                last = start
            start = min(max(s.start, lo, merged[-1].start if merged else 0.0), hi)
            if words:
                start = min(start, words[0].start)
            end = min(max(s.end, start, words[-1].end if words else start), hi)
            s.start, s.end, s.words = round(start, 3), round(end, 3), words
            merged.append(s)
    return merged
