"""Real human speech recordings committed under tests/data/speech (see its README.md for sources), and
audio sources for live streams in tests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import av
import numpy as np

from stt.streaming import PcmAudio
from tests.support.audio import SR, resample

DATA = Path(__file__).resolve().parents[1] / "data" / "speech"


@dataclass(frozen=True)
class RealClip:
    name: str  # file name without .flac
    path: Path
    text: str  # reference transcript, as the source writes it (compare with tests.support.text.wer)
    seconds: float
    sample_rate: int  # native rate of the file: 8000, 16000 or 22050
    speakers: int
    speaker_desc: str
    conditions: tuple[str, ...]
    source: str
    licence: str
    attribution: str
    notes: str = ""  # caveats about the reference, if any

    def has(self, condition: str) -> bool:
        """True if any condition mentions `condition` (case-insensitive), e.g. clip.has("8 kHz")."""
        return any(condition.lower() in c.lower() for c in self.conditions)


def real_clips() -> list[RealClip]:
    """Every clip in manifest.json, in manifest order."""
    return list(_clips())


@cache
def _clips() -> tuple[RealClip, ...]:
    rows = json.loads((DATA / "manifest.json").read_text())
    return tuple(
        RealClip(
            name=r["file"].removesuffix(".flac"),
            path=DATA / r["file"],
            text=r["text"],
            seconds=float(r["seconds"]),
            sample_rate=int(r["sample_rate"]),
            speakers=int(r["speakers"]),
            speaker_desc=r["speaker_desc"],
            conditions=tuple(r["conditions"]),
            source=r["source"],
            licence=r["licence"],
            attribution=r["attribution"],
            notes=r.get("notes", ""),
        )
        for r in rows
    )


def by_name(name: str) -> RealClip:
    """The clip called `name` (with or without .flac)."""
    name = name.removesuffix(".flac")
    for clip in _clips():
        if clip.name == name:
            return clip
    raise KeyError(f"no real clip {name!r}; have {[c.name for c in real_clips()]}")


def load_native(clip: RealClip) -> np.ndarray:
    """float32 mono samples at the file's own rate (clip.sample_rate)."""
    with av.open(str(clip.path)) as container:
        stream = container.streams.audio[0]
        frames = [f.to_ndarray().reshape(-1) for f in container.decode(stream)]
    pcm = np.concatenate(frames)
    if pcm.dtype == np.int16:
        return pcm.astype(np.float32) / 32768.0
    return pcm.astype(np.float32)


def load_16k(clip: RealClip) -> np.ndarray:
    """float32 mono 16 kHz (8 kHz and 22.05 kHz files are resampled with PyAV)."""
    return resample(load_native(clip), clip.sample_rate, SR)


async def paced(pcm: PcmAudio, speed: float) -> AsyncIterator[bytes]:
    """The audio in 0.1 s pieces at `speed` x real time."""
    step = int(pcm.sample_rate * 0.1) * 2 * pcm.channels
    t0 = time.monotonic()
    for i, off in enumerate(range(0, len(pcm.data), step)):
        delay = t0 + i * 0.1 / speed - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        yield pcm.data[off : off + step]


@contextlib.asynccontextmanager
async def held_stream(client: Any) -> AsyncIterator[None]:
    """A live stream (on an AsyncClient) that sends 0.1 s of silence and then stays open, holding its
    slot (quota, admission), until the block ends; then it ends its audio and is closed. A failure of
    the held stream fails the block when the block itself succeeded."""
    gate = asyncio.Event()

    async def audio() -> AsyncIterator[bytes]:
        yield b"\x00\x00" * 1600
        await gate.wait()

    stream = client.stream(audio(), interim=False)
    holder = asyncio.ensure_future(anext(stream, None))
    ok = False
    try:
        yield
        ok = True
    finally:
        gate.set()
        if ok:
            await holder
        else:
            await asyncio.gather(holder, return_exceptions=True)
        await stream.aclose()
