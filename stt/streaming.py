"""Helpers for StreamingRecognize: turn a file into audio chunks, optionally at real-time pace.

async with AsyncClient() as client:
    async for resp in client.stream(file_chunks("call.wav", realtime=True), interim=True):
        for r in resp.results:
            print("final" if r.is_final else "interim", r.transcript)
"""

from __future__ import annotations

import asyncio
import io
import os
import time
import wave
from collections.abc import AsyncIterator
from dataclasses import dataclass

SAMPLE_RATE = 16_000


@dataclass
class PcmAudio:
    """LINEAR16 little-endian PCM ready to stream."""

    data: bytes
    sample_rate: int
    channels: int

    @property
    def seconds(self) -> float:
        return len(self.data) / (2 * self.channels * self.sample_rate)


def load_pcm(source: bytes | str | os.PathLike[str]) -> PcmAudio:
    """A WAV file as-is (stdlib); any other format decoded to 16 kHz mono with PyAV (if installed)."""
    data = source if isinstance(source, bytes) else open(source, "rb").read()  # noqa: SIM115
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        try:
            with wave.open(io.BytesIO(data)) as w:
                if w.getsampwidth() == 2 and w.getcomptype() == "NONE":
                    return PcmAudio(w.readframes(w.getnframes()), w.getframerate(), w.getnchannels())
        except wave.Error:
            pass
    try:
        import av
    except ImportError as exc:  # pragma: no cover - the CLI's venv has PyAV
        raise RuntimeError("decoding this file needs PyAV: pip install av") from exc
    out = bytearray()
    resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
    with av.open(io.BytesIO(data), mode="r") as container:
        for frame in container.decode(audio=0):
            for f in resampler.resample(frame):
                out += bytes(f.planes[0])[: f.samples * 2]
        for f in resampler.resample(None):
            out += bytes(f.planes[0])[: f.samples * 2]
    return PcmAudio(bytes(out), SAMPLE_RATE, 1)


async def pcm_chunks(
    audio: PcmAudio, *, chunk_seconds: float = 0.1, realtime: bool = False
) -> AsyncIterator[bytes]:
    """The audio in chunks of `chunk_seconds`; with realtime, each chunk is sent when the clock says
    that much audio has been spoken."""
    step = max(1, int(audio.sample_rate * chunk_seconds)) * 2 * audio.channels
    start = time.monotonic()
    for i, offset in enumerate(range(0, len(audio.data), step)):
        if realtime:
            due = start + i * chunk_seconds
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        yield audio.data[offset : offset + step]


async def paced_bytes(
    data: bytes, seconds: float, *, chunks_per_second: int = 10, realtime: bool = True
) -> AsyncIterator[bytes]:
    """A compressed stream (OGG/Opus, WebM, MP3, FLAC) cut into equal byte pieces sent at the pace of its
    duration (an approximation of how an encoder would emit it)."""
    n = max(1, int(seconds * chunks_per_second))
    size = -(-len(data) // n)
    start = time.monotonic()
    for i in range(n):
        if realtime:
            delay = start + i / chunks_per_second - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        piece = data[i * size : (i + 1) * size]
        if piece:
            yield piece
