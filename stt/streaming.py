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
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

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


LOOKAHEAD_BYTES = 256 * 1024  # audio pulled from the source ahead of what was written
# A compressed stream is resumed by sending it again from its first byte, so its bytes are kept; past
# this size it is no longer resumable (at 32 kbit/s Opus ~4.6 hours, at 128 kbit/s MP3 ~70 minutes).
REPLAY_MAX_BYTES = 64 * 1024 * 1024
WRITE_PIECE = 64 * 1024  # largest audio_content the SDK writes (resent audio is cut into these)


class Outbox:
    """The audio of one live stream, shared by its successive calls (a resumed stream is a new call).

    One task pulls the caller's source (never cancelled between calls, so a generator source is not
    broken by a reconnect), at most LOOKAHEAD_BYTES ahead of the furthest byte any call has written
    (not of the current call's position: while a new call sends kept audio again, the source, a
    microphone say, goes on being read). `write()` sends the
    audio of one call from an absolute byte offset. With `frame_bytes` and `sample_rate` (LINEAR16),
    the bytes after the latest acknowledged offset are kept (`trim()`), so a new call can send them
    again. With `replay` (compressed audio, whose bytes cannot be cut at an offset) every byte is
    kept, up to REPLAY_MAX_BYTES, and a new call sends the stream again from its first byte
    (`resume_audio_from_start`). Otherwise nothing is kept once written and the stream cannot be
    resumed."""

    def __init__(
        self,
        source: AsyncIterable[bytes] | Iterable[bytes],
        *,
        frame_bytes: int = 0,
        sample_rate: int = 0,
        replay: bool = False,
    ) -> None:
        self.source = source
        self.frame_bytes = frame_bytes
        self.sample_rate = sample_rate
        self.replay = replay and not self._by_offset
        self.data = bytearray()
        self.base = 0  # absolute byte offset of data[0]
        self.sent = 0  # absolute bytes written by the current call
        self.high = 0  # the furthest absolute byte written by any call
        self.eof = False
        self.error: BaseException | None = None
        self._more = asyncio.Event()
        self._taken = asyncio.Event()
        self._pump: asyncio.Task[None] | None = None

    @property
    def resumable(self) -> bool:
        return self._by_offset or (self.replay and self.base == 0)

    @property
    def _by_offset(self) -> bool:
        return self.frame_bytes > 0 and self.sample_rate > 0

    @property
    def end(self) -> int:
        return self.base + len(self.data)

    def byte_offset(self, seconds: float) -> int:
        """The absolute byte a resumed call starts from: where stream second `seconds` starts
        (LINEAR16), or the first byte (replay)."""
        if not self._by_offset:
            return 0
        return round(seconds * self.sample_rate) * self.frame_bytes

    def trim(self, seconds: float) -> None:
        """The audio before `seconds` is acknowledged: forget it (LINEAR16; a replayed stream keeps
        everything)."""
        if self._by_offset:
            self._drop(min(self.byte_offset(seconds), self.end))

    def _drop(self, upto: int) -> None:
        if upto > self.base:
            del self.data[: upto - self.base]
            self.base = upto

    def start(self) -> None:
        if self._pump is None:
            self._pump = asyncio.create_task(self._pull())

    async def close(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            await asyncio.gather(self._pump, return_exceptions=True)

    async def _pull(self) -> None:
        try:
            if isinstance(self.source, AsyncIterable):
                async for chunk in self.source:
                    await self._add(chunk)
            else:
                # A blocking source (a microphone, a file read at real-time pace) is read in a thread.
                chunks = iter(self.source)

                def pull() -> bytes | None:
                    return next(chunks, None)

                while (piece := await asyncio.to_thread(pull)) is not None:
                    await self._add(piece)
        except Exception as exc:  # the audio source failed: the stream ends with its error
            self.error = exc
        finally:
            self.eof = True
            self._more.set()

    async def _add(self, chunk: bytes) -> None:
        if chunk:
            self.data += chunk
            self._more.set()
        while self.end - max(self.high, self.base) > LOOKAHEAD_BYTES:
            self._taken.clear()
            await self._taken.wait()

    async def write(self, call: Any, first: Any, start: int, request: Callable[[bytes], Any]) -> None:
        """Write `first` (the config), the audio from absolute byte `start`, then half-close."""
        self.start()
        await call.write(first)
        pos = max(start, self.base)
        self.sent = pos
        self._taken.set()
        while True:
            if pos < self.end:
                i = pos - self.base
                piece = bytes(self.data[i : i + WRITE_PIECE])
                await call.write(request(piece))
                pos += len(piece)
                self.sent = pos
                self.high = max(self.high, pos)
                if not self.resumable or (self.replay and self.end > REPLAY_MAX_BYTES):
                    self._drop(pos)  # not kept (a replayed stream past its cap is no longer resumable)
                self._taken.set()
            elif self.eof:
                if self.error is not None:
                    raise self.error
                await call.done_writing()
                return
            else:
                self._more.clear()
                await self._more.wait()
