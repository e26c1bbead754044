"""Cut audio at pauses into windows of at most 30 s, and merge window results back. No grpc.

Windows are cut in the middle of the pauses Silero VAD finds, so no word is split; stretches
without speech are skipped (no invented words on silence). A single stretch of speech longer than
the maximum is cut at its quietest point.
"""

from __future__ import annotations

import itertools
import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

from services.shared.domain import MAX_WINDOW_SECONDS, SAMPLE_RATE, Segment, Word, fold_allowance
from services.shared.pcm import from_pcm16

T = TypeVar("T")


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
    total = audio.shape[0]
    if regions and total <= int(max_seconds * SAMPLE_RATE):
        return [Window(0, total)]  # it all fits: the whole audio, as the model would see a file
    planner = WindowPlanner(lambda lo, hi: audio[lo:hi], max_seconds=max_seconds)
    out = planner.add(regions, total)
    return out + planner.finish(audio.shape[0])


class WindowPlanner:
    """Speech regions -> windows, incrementally: a window is given out as soon as it is settled (the
    next stretch of speech no longer fits in it), so the first window can be transcribed while later
    audio is still being decoded and searched for speech. Regions arrive in order, each final (the
    last one may be added again, longer, with `final=False` while it may still grow). Fed all at once
    it plans exactly what the whole-audio plan would; fed piece by piece, the same.

    Rules: a region longer than the limit is cut at its quietest point (searching its last half);
    consecutive pieces are grouped while the group spans at most the limit; each window is widened
    into half of the pause on either side, up to 1 s (the model does better with some silence around
    speech), staying disjoint and within the limit. Audio that fits in one window is one window, the
    whole audio (as the model would see a file)."""

    def __init__(self, read: Callable[[int, int], np.ndarray], *, max_seconds: float = MAX_WINDOW_SECONDS):
        self.read = read  # (start, end) -> float32 samples: needed only to cut long speech
        self.limit = int(max_seconds * SAMPLE_RATE)
        self._group: tuple[int, int] | None = None
        self._group_pieces: list[tuple[int, int]] = []
        # The last windows given out, with what they were made of (for `rebalance`).
        self._history: deque[_Closed] = deque(maxlen=REBALANCE_HISTORY)
        self._prev_end = 0  # unwidened end of the last closed window
        self._held: list[Window] = []  # settled windows kept back while the audio may fit in one
        self._any = False
        self._released = False

    def add(self, regions: list[tuple[int, int]], total: int) -> list[Window]:
        """Final regions (in order, within [0, total)); `total` = samples known so far."""
        out: list[Window] = []
        for start, end in regions:
            start, end = max(0, start), min(total, end)
            while end - start > self.limit:
                cut = _quietest_cut_read(self.read, start + self.limit // 2, start + self.limit)
                out += self._piece(start, cut)
                start = cut
            if end > start:
                out += self._piece(start, end)
        return self._release(out, total)

    def split_growing(self, start: int, end: int) -> tuple[list[Window], int]:
        """A region still growing: cut off the pieces its final length will cut off anyway (so memory
        stays bounded under long speech). Returns the windows settled and the new start."""
        out: list[Window] = []
        while end - start > self.limit:
            cut = _quietest_cut_read(self.read, start + self.limit // 2, start + self.limit)
            out += self._piece(start, cut)
            start = cut
        return out, start

    def _piece(self, start: int, end: int) -> list[Window]:
        self._any = True
        if self._group is None:
            self._group, self._group_pieces = (start, end), [(start, end)]
            return []
        g_start, _ = self._group
        if end - g_start <= self.limit:
            self._group = (g_start, end)
            self._group_pieces.append((start, end))
            return []
        closed = self._close(Window(*self._group), start)
        self._group, self._group_pieces = (start, end), [(start, end)]
        return [closed]

    def _close(self, w: Window, next_start: int, total: int | None = None) -> Window:
        prev_end = self._prev_end
        out = _widen(w.start, w.end, prev_end, next_start, self.limit)
        if total is not None:
            out = Window(out.start, min(total, out.end))
        self._history.append(_Closed(out, tuple(self._group_pieces), prev_end, next_start, total))
        self._prev_end = w.end
        return out

    def balance(self, tail: list[Window], replicas: int) -> list[Window]:
        """The last windows given out (`tail`, none sent yet) cut again so each of `replicas`
        transcribers gets as many, as long (`rebalance` into `balanced_count` windows); unchanged
        for one replica (the plan stays what the audio alone decides)."""
        if replicas <= 1 or len(tail) < 2:
            return tail
        again = self.rebalance(tail, balanced_count(tail, replicas))
        # Kept only when it shares the work better, without a window much shorter than the plan's
        # (a short window costs a whole encoder pass, and near-empty ones are where Whisper invents).
        shortest = min(MIN_BALANCED_WINDOW_SECONDS, min(w.seconds for w in tail))
        if min(w.seconds for w in again) < shortest or _busiest(again, replicas) >= _busiest(tail, replicas):
            return tail
        return again

    def rebalance(self, tail: list[Window], parts: int) -> list[Window]:
        """The last windows given out (`tail`, not sent yet) cut again into `parts` windows as even
        as the pauses allow (fewer if there are fewer pieces of speech, more if they do not fit in
        fewer), in the same pauses and by the same rules: so that N transcribers get the same amount of
        audio each (7 windows of up to 30 s on 2 replicas keep one busy for 4 windows while the other
        does 3; 8 of ~25 s take 4 each). The windows unchanged when `tail` is not this planner's last
        windows or `parts` is below 1."""
        n = len(tail)
        if parts < 1 or n == 0 or n > len(self._history):
            return tail
        closed = list(self._history)[-n:]
        if [c.window for c in closed] != tail:
            return tail
        pieces = [p for c in closed for p in c.pieces]
        groups = _even_groups(pieces, parts, self.limit)
        out: list[Window] = []
        prev_end = closed[0].prev_end
        for i, (start, end) in enumerate(groups):
            next_start = groups[i + 1][0] if i + 1 < len(groups) else closed[-1].next_start
            w = _widen(start, end, prev_end, next_start, self.limit)
            out.append(w)
            prev_end = end
        total = closed[-1].total
        if total is not None:
            out[-1] = Window(out[-1].start, min(total, out[-1].end))
        return out

    def _release(self, windows: list[Window], total: int) -> list[Window]:
        if self._released:
            return windows
        self._held += windows
        if total <= self.limit:
            return []
        self._released = True
        out, self._held = self._held, []
        return out

    def finish(self, total: int) -> list[Window]:
        """The audio ended at `total` samples: the remaining windows."""
        if total <= self.limit:
            self._group, self._held = None, []
            return [Window(0, total)] if self._any else []
        out = self._release([], total)
        if self._group is not None:
            out.append(self._close(Window(*self._group), total, total))
            self._group = None
        return out


# Windows `rebalance` can cut again: what is held when planning ends is at most 1.25 x the batch
# capacity of every replica together (8 windows each on a CPU, 24 on a GPU), so ~100 CPU or ~40 GPU
# replicas; a longer tail is left as planned.
REBALANCE_HISTORY = 1024
MIN_BALANCED_WINDOW_SECONDS = 5.0  # `balance` makes no window shorter than this (or the plan's shortest)


@dataclass(frozen=True, slots=True)
class _Closed:
    """A window given out: the speech pieces it was made of, the end of the speech before it, the
    start of the speech after it, and the end of the audio when it was the last."""

    window: Window
    pieces: tuple[tuple[int, int], ...]
    prev_end: int
    next_start: int
    total: int | None


def _widen(start: int, end: int, prev_end: int, next_start: int, limit: int) -> Window:
    """Speech [start, end) widened into half of the pause on either side, up to 1 s each, staying
    within `limit` samples."""
    lo = max(prev_end + (start - prev_end) // 2, start - SAMPLE_RATE)
    hi = min(end + (next_start - end) // 2, end + SAMPLE_RATE)
    slack = limit - (end - start)
    lo = max(lo, start - slack // 2)
    hi = min(hi, end + (slack - (start - lo)))
    return Window(max(0, lo), hi)


def _even_groups(pieces: list[tuple[int, int]], parts: int, limit: int) -> list[tuple[int, int]]:
    """Consecutive speech pieces in `parts` groups (as many as there are pieces at most), each
    spanning at most `limit` samples, cut in the pauses nearest to an even split of their span."""
    n = len(pieces)
    need = _fewest_groups(pieces, limit)  # need[j]: fewest groups pieces[j:] fit in
    parts = min(max(parts, need[0]), n)
    first, last = pieces[0][0], pieces[-1][1]
    floor = (last - first) // (2 * parts)  # a group shorter than half the even share only if forced
    bounds: list[int] = [0]  # index of each group's first piece
    for i in range(1, parts):
        ideal = first + (last - first) * i // parts
        begin = bounds[-1]
        best, best_key = -1, (True, 0)
        # Group i-1 is pieces[begin:j]; at least one piece for each group after it, and what is
        # left must still fit in those groups.
        for j in range(begin + 1, n - (parts - i) + 1):
            if pieces[j - 1][1] - pieces[begin][0] > limit:
                break
            if need[j] <= parts - i:
                short = pieces[j - 1][1] - pieces[begin][0] < floor or pieces[-1][1] - pieces[j][0] < floor
                key = (short, abs((pieces[j - 1][1] + pieces[j][0]) // 2 - ideal))
                if best < 0 or key < best_key:
                    best, best_key = j, key
        if best < 0:  # (cannot happen when the pieces made at most `parts` windows before)
            return _fill(pieces, limit)
        bounds.append(best)
    bounds.append(n)
    return [(pieces[a][0], pieces[b - 1][1]) for a, b in itertools.pairwise(bounds)]


def _fewest_groups(pieces: list[tuple[int, int]], limit: int) -> list[int]:
    """For each j, the fewest groups of at most `limit` samples pieces[j:] fit in (filling each
    group as far as it goes is optimal), in one pass from the end."""
    n = len(pieces)
    need = [0] * (n + 1)
    k = n  # pieces[j:k] is the first group of pieces[j:]; k only moves left as j does
    for j in range(n - 1, -1, -1):
        while k - 1 > j and pieces[k - 1][1] - pieces[j][0] > limit:
            k -= 1
        need[j] = 1 + need[k]
    return need


def _fill(pieces: list[tuple[int, int]], limit: int) -> list[tuple[int, int]]:
    """Consecutive pieces grouped while a group spans at most `limit` samples (fewest groups)."""
    out: list[tuple[int, int]] = []
    for start, end in pieces:
        if out and end - out[-1][0] <= limit:
            out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


def _busiest(windows: list[Window], replicas: int) -> float:
    """The most work one replica gets when windows are handed out in turn (as the pool does with a
    group sent at once): audio seconds plus ~3 s a window for its encoder pass (1-thread CPU: 4 windows
    of 29 s took 4.0 s, 4 of 25 s 3.5 s)."""
    return max(sum(w.seconds + 3.0 for w in windows[r::replicas]) for r in range(replicas))


def balanced_count(windows: list[Window], replicas: int, *, min_seconds: float = 15.0) -> int:
    """How many windows to cut `windows` into so `replicas` transcribers get as many each: the next
    multiple of `replicas`, unless that makes windows shorter than `min_seconds` on average (each
    window costs a whole 30 s encoder pass and short ones give the model less context)."""
    n = len(windows)
    if replicas <= 1 or n < 2:
        return n
    want = -(-n // replicas) * replicas
    if sum(w.seconds for w in windows) / want < min_seconds:
        return n
    return want


def _quietest_cut_read(read: Callable[[int, int], np.ndarray], lo: int, hi: int) -> int:
    frame = SAMPLE_RATE // 20
    if hi - lo <= frame:
        return hi
    return lo + _quietest_cut(read(lo, hi), 0, hi - lo)


VAD_BLOCK_SECONDS = 60.0
JOIN_GAP = SAMPLE_RATE // 10  # regions meeting at a block boundary closer than this are one
JOIN_EDGE = SAMPLE_RATE // 2
SILENT_PEAK = 10 ** (-70 / 20)  # a block that never gets louder than -70 dBFS has no speech


class StreamingPlanner:
    """Decoded audio in, windows out, while the audio is still arriving: Silero VAD runs on blocks of
    `block_seconds` (regions that meet at a block boundary are joined), and the WindowPlanner gives
    out each window once it is settled. Blocks are searched for speech on a small shared thread
    pool, several at once when the decoder is ahead (VAD is single-threaded; decoding is faster),
    and their results are taken in order. Holds a few blocks plus one window of audio.
    Deterministic: the same audio gives the same windows however it is fed."""

    def __init__(self, vad: VadSettings, *, block_seconds: float = VAD_BLOCK_SECONDS,
                 max_seconds: float = MAX_WINDOW_SECONDS) -> None:  # fmt: skip
        self.vad = vad
        self.block = int(block_seconds * SAMPLE_RATE)
        self.planner = WindowPlanner(self._read, max_seconds=max_seconds)
        self.total = 0  # samples fed
        self.queued = 0  # samples handed to VAD
        self._inflight: deque[tuple[int, int, Future[tuple[list[tuple[int, int]], float]]]] = deque()
        self._pending: list[np.ndarray] = []  # fed, not yet joined into _audio
        self._audio = np.zeros(0, dtype=np.float32)  # samples [_audio_start, _audio_start + len)
        self._audio_start = 0
        self._held: tuple[int, int] | None = None  # the last region, which may still grow
        self.vad_seconds = 0.0  # time spent in VAD (for the bench's timeline)

    def _read(self, lo: int, hi: int) -> np.ndarray:
        return self._audio[lo - self._audio_start : hi - self._audio_start]

    def feed(self, samples: np.ndarray) -> list[Window]:
        if samples.shape[0] == 0:
            return []
        self._pending.append(samples)
        self.total += samples.shape[0]
        out: list[Window] = []
        while self.total - self.queued >= self.block:
            out += self._submit(self.queued + self.block)
        return out + self._collect(wait=False)

    def balance(self, tail: list[Window], replicas: int) -> list[Window]:
        """See WindowPlanner.balance (once planning has finished)."""
        return self.planner.balance(tail, replicas)

    def finish(self) -> list[Window]:
        out: list[Window] = []
        if self.total > self.queued:
            out += self._submit(self.total)
        out += self._collect(wait=True)
        if self._held is not None:
            out += self.planner.add([self._held], self.total)
            self._held = None
        return out + self.planner.finish(self.total)

    def _submit(self, end: int) -> list[Window]:
        """Search [queued, end) for speech in the background; at most VAD_AHEAD blocks at once."""
        if self._pending:
            self._audio = np.concatenate([self._audio, *self._pending])
            self._pending = []
        block = self._read(self.queued, end)  # a view: stays valid when _audio is replaced
        self._inflight.append((self.queued, end, _VAD_POOL.submit(_search, block, self.vad)))
        self.queued = end
        out: list[Window] = []
        while len(self._inflight) > VAD_AHEAD:
            out += self._take()
        return out

    def _collect(self, *, wait: bool) -> list[Window]:
        out: list[Window] = []
        while self._inflight and (wait or self._inflight[0][2].done()):
            out += self._take()
        return out

    def _take(self) -> list[Window]:
        offset, end, fut = self._inflight.popleft()
        found, seconds = fut.result()
        self.vad_seconds += seconds
        final: list[tuple[int, int]] = []
        for start, stop in ((a + offset, b + offset) for a, b in found):
            held = self._held
            if held is not None and start - held[1] <= JOIN_GAP and start - offset <= JOIN_EDGE:
                self._held = (held[0], stop)
                continue
            if held is not None:
                final.append(held)
            self._held = (start, stop)
        if self._held is not None and self._held[1] < end - JOIN_GAP:
            final.append(self._held)  # ends well before the block does: cannot grow
            self._held = None
        out = self.planner.add(final, end)
        if self._held is not None:
            settled, start = self.planner.split_growing(*self._held)
            out += settled
            self._held = (start, self._held[1])
        # Keep what the held region may still need (to cut it if it grows past the limit) and the
        # blocks still being searched.
        drop = (self._held[0] if self._held is not None else end) - self._audio_start
        if drop > 0:
            self._audio = self._audio[drop:].copy()
            self._audio_start += drop
        return out


VAD_AHEAD = 3  # blocks searched at once per planner
_VAD_POOL = ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="vad")


def _search(block: np.ndarray, vad: VadSettings) -> tuple[list[tuple[int, int]], float]:
    """(Speech regions in the block, seconds it took.)"""
    t0 = time.perf_counter()
    if block.shape[0] and float(np.abs(block).max()) < SILENT_PEAK:
        return [], time.perf_counter() - t0  # digital silence (padding, a muted microphone)
    return speech_regions(block, vad), time.perf_counter() - t0


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


class WindowGroups(Generic[T]):
    """Planned windows (or anything standing for them) handed to the transcribers in groups of a
    model call's size (`size()`) while planning goes on, balanced so no call is nearly empty: a full
    group leaves only once `size() // 4 + 1` more windows are planned (at once when `size() // 4` is
    0), and when planning ends what is held goes together (a full group plus at most `size() // 4`,
    which the transcriber's batcher takes as one call; see Batcher._take). On 2 cores a call of 9
    windows costs ~0.5 s less than one of 8 and one of 1 (the decoder's cost is per step, nearly the
    same for 1 or 10 windows)."""

    def __init__(self, size: Callable[[], int]) -> None:
        self._size = size
        self._held: list[T] = []

    def add(self, w: T) -> list[T]:
        """Hold `w`; the windows to send now (a full group, or nothing)."""
        self._held.append(w)
        n = max(1, self._size())
        extra = fold_allowance(n)
        # With nothing to fold (calls of 1-3 windows), a full group leaves at once.
        if len(self._held) >= n + extra + (1 if extra else 0):
            out, self._held = self._held[:n], self._held[n:]
            return out
        return []

    def finish(self) -> list[T]:
        """Planning ended: everything still held."""
        out, self._held = self._held, []
        return out
