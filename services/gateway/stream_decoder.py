"""Incremental audio decoding for live streams: bytes in as they arrive, 16 kHz mono float32 out.

LINEAR16 is converted inline. Compressed streams (OGG/Opus, WebM/Opus, FLAC, MP3) are demuxed and
decoded by PyAV in a worker thread that reads from a blocking pipe, so audio is decoded as soon as
enough bytes for a frame have arrived. No grpc here.

Bounds: the pipe holds at most PIPE_BYTES undecoded bytes (the reader awaits `room()` before reading
the client's next message, so a stream whose bytes do not decode cannot pile them up); the bytes and
the decoded duration of a stream are checked against its Limits as they arrive; a decoding error
resolves `done` at once (the session ends with it, not with the client's next message); at most
MAX_DECODER_THREADS decoder threads run in a process (a stream beyond it is refused with
RESOURCE_EXHAUSTED, SERVER_BUSY), and idle streams are ended by the idle timeout, so idle streams
cannot hold threads for long.
"""

from __future__ import annotations

import asyncio
import io
import logging
import queue
import threading
from collections.abc import Callable

import av
import av.error
import numpy as np

from services.gateway.audio import (
    AV_ERRORS,
    CODECS,
    Limits,
    Linear16Decoder,
    Linear16Start,
    Resampler,
    check_size,
    check_stream,
)
from services.shared.errors import Internal, InvalidInput, LimitExceeded, ServiceError
from services.shared.metrics import DECODE_REJECTIONS

log = logging.getLogger("gateway.stream_decoder")

# Streaming encodings -> the ffmpeg demuxer to force (no probing delay).
STREAM_FORMATS = {
    "OGG_OPUS": "ogg",
    "OGG_VORBIS": "ogg",
    "WEBM_OPUS": "matroska",
    "FLAC": "flac",
    "MP3": "mp3",
}
STREAM_ENCODINGS = ("LINEAR16", *STREAM_FORMATS)
# What a LINEAR16 stream that is a file (not a WAV of 16-bit PCM) should be sent as instead.
_COMPRESSED = ", ".join(STREAM_FORMATS)
FILE_AS_LINEAR16_ADVICE = (
    f"stream it with its own encoding if it is one of {_COMPRESSED}, or send its 16-bit samples without "
    "a header as LINEAR16"
)


def _starts_right(encoding: str, head: bytes) -> bool:
    """Whether a stream's first bytes can begin this encoding. FFmpeg's demuxers resync on garbage
    (they keep reading, looking for the next page or frame), so a stream that is not what its config
    says would otherwise fail only when the client stops sending."""
    if encoding in ("OGG_OPUS", "OGG_VORBIS"):
        return head.startswith(b"OggS")
    if encoding == "WEBM_OPUS":
        return head.startswith(b"\x1a\x45\xdf\xa3")
    if encoding == "FLAC":
        return head.startswith((b"fLaC", b"ID3"))
    if encoding == "MP3":
        return head.startswith(b"ID3") or (head[0] == 0xFF and head[1] & 0xE0 == 0xE0)
    return True


AudioSink = Callable[[np.ndarray], None]
PIPE_BYTES = 1 << 20  # undecoded bytes a compressed stream may have waiting for its decoder
MAX_DECODER_THREADS = 256
_threads = threading.BoundedSemaphore(MAX_DECODER_THREADS)


class StreamDecoder:
    """feed(bytes) any number of times, then finish(). Decoded audio goes to `sink` on the event
    loop; `done` resolves when all audio is out (or with the decoding error)."""

    def __init__(self, sink: AudioSink, loop: asyncio.AbstractEventLoop) -> None:
        self.sink = sink
        self.loop = loop
        self.done: asyncio.Future[None] = loop.create_future()

    def feed(self, data: bytes) -> None:
        raise NotImplementedError

    async def room(self) -> None:
        """Wait until the decoder can take more bytes (returns at once when decoding has failed)."""

    def finish(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Abandon decoding (client gone); frees the worker."""

    def _fail(self, exc: BaseException) -> None:
        if isinstance(exc, ServiceError):
            DECODE_REJECTIONS.labels(exc.reason).inc()
        if not self.done.done():
            self.done.set_exception(exc)

    def _finish_ok(self) -> None:
        if not self.done.done():
            self.done.set_result(None)


class PcmStreamDecoder(StreamDecoder):
    def __init__(self, sink: AudioSink, loop: asyncio.AbstractEventLoop, sample_rate: int, channels: int,
                 limits: Limits) -> None:  # fmt: skip
        super().__init__(sink, loop)
        self._dec = Linear16Decoder(sample_rate, channels, limits)
        self.limits = limits
        self._bytes = 0
        # The stream's first bytes, until judged: raw samples, a WAV header of the stream's format
        # (dropped up to its data), or a file sent with the wrong encoding (refused at once).
        self._start: Linear16Start | None = Linear16Start(
            sample_rate, channels, "streaming_config.config.encoding", FILE_AS_LINEAR16_ADVICE, _COMPRESSED
        )

    def feed(self, data: bytes) -> None:
        try:
            if self._start is not None:
                samples = self._start.feed(data)
                if self._start.done:
                    self._start = None
            else:
                samples = data
            self._bytes += len(data)  # a WAV header's bytes too
            try:
                if self._bytes > self.limits.max_bytes:
                    check_size(self._bytes, self.limits)
            except ServiceError as exc:
                raise exc.relocated({"content": "audio_content"}) from None
            for block in self._dec.push(samples):
                self.sink(block)
        except ServiceError as exc:
            self._fail(exc)
            raise

    def finish(self) -> None:
        try:
            if self._start is not None:
                for block in self._dec.push(self._start.finish()):
                    self.sink(block)
                self._start = None
            for block in self._dec.flush():
                self.sink(block)
        except ServiceError as exc:
            if exc.reason == "PARTIAL_FRAME":  # (its message and field are Recognize's content)
                channels = self._dec.channels
                exc = InvalidInput(
                    f"the stream's LINEAR16 audio ends with an incomplete frame ({2 * channels} bytes: a "
                    f"16-bit sample for each of {channels} channel(s)); messages may split frames, the "
                    "stream's audio as a whole may not",
                    reason="PARTIAL_FRAME",
                    field="audio_content",
                )
            self._fail(exc)
            raise exc from None
        self._finish_ok()


HEAD_KEEP = 64 * 1024  # bytes of a compressed stream's start kept to judge a stream cut short


class _Pipe(io.RawIOBase):
    """A blocking byte pipe: the event loop writes, the decoder thread reads; `pending` counts the
    bytes written and not yet read, and `on_read` is called (in the reader's thread) after a read."""

    def __init__(self, on_read: Callable[[], None]) -> None:
        self._q: queue.Queue[bytes | None] = queue.Queue()
        self._buf = b""
        self._eof = False
        self._lock = threading.Lock()
        self.pending = 0
        self._on_read = on_read

    def readable(self) -> bool:
        return True

    def write_bytes(self, data: bytes) -> None:
        with self._lock:
            self.pending += len(data)
        self._q.put(data)

    def close_writer(self) -> None:
        self._q.put(None)

    @property
    def ended(self) -> bool:
        """The reader has reached the end of what the writer wrote (it closed)."""
        return self._eof and not self._buf

    def readinto(self, b: bytearray) -> int:  # type: ignore[override]
        while not self._buf and not self._eof:
            item = self._q.get()
            if item is None:
                self._eof = True
            else:
                self._buf = item
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        with self._lock:
            self.pending -= n
        self._on_read()
        return n


class ContainerStreamDecoder(StreamDecoder):
    def __init__(
        self, sink: AudioSink, loop: asyncio.AbstractEventLoop, encoding: str, limits: Limits
    ) -> None:
        super().__init__(sink, loop)
        self.encoding = encoding
        self.limits = limits
        self._bytes = 0
        self._prefix = bytearray()  # the first HEAD_KEEP bytes (its first 4: see feed; _cut_short)
        self._room = asyncio.Event()
        self._room.set()
        self._pipe = _Pipe(self._read_some)
        self._abandoned = threading.Event()
        if not _threads.acquire(blocking=False):
            raise LimitExceeded(
                f"this gateway is decoding {MAX_DECODER_THREADS} compressed streams; retry later or "
                "send LINEAR16",
                reason="SERVER_BUSY",
            )
        self._thread = threading.Thread(target=self._run, name=f"decode-{encoding}", daemon=True)
        self._thread.start()

    def feed(self, data: bytes) -> None:
        if self.done.done():
            self.done.result()  # re-raise the decoding error
        self._bytes += len(data)
        had = len(self._prefix)
        if had < HEAD_KEEP:
            self._prefix += data[: HEAD_KEEP - had]
        if had < 4 <= len(self._prefix) and not _starts_right(self.encoding, bytes(self._prefix[:4])):
            exc = InvalidInput(
                f"the stream is not {self.encoding} audio (it does not start like one)",
                reason="UNDECODABLE_AUDIO",
                field="audio_content",
            )
            self._fail(exc)
            self.close()
            raise exc
        try:
            if self._bytes > self.limits.max_bytes:
                check_size(self._bytes, self.limits)
        except ServiceError as exc:
            self._fail(exc)
            self.close()
            raise exc.relocated({"content": "audio_content"}) from None
        self._pipe.write_bytes(data)

    async def room(self) -> None:
        while self._pipe.pending >= PIPE_BYTES and not self.done.done() and not self._abandoned.is_set():
            self._room.clear()
            if self._pipe.pending < PIPE_BYTES:  # read meanwhile (the reader saw the event still set)
                break
            await self._room.wait()

    def _read_some(self) -> None:
        if self._pipe.pending < PIPE_BYTES and not self._room.is_set():
            self.loop.call_soon_threadsafe(self._room.set)

    def finish(self) -> None:
        self._pipe.close_writer()

    def close(self) -> None:
        self._abandoned.set()
        self._pipe.close_writer()

    def _cut_short(self) -> bool:
        """The stream ended inside its headers, and they are well formed so far (rather than being
        something else that only starts right: FFmpeg says "end of file" or "invalid data" for
        both): FLAC metadata blocks (STREAMINFO first, known types) or OGG pages. Other encodings:
        no."""
        if self._bytes > HEAD_KEEP:
            return False
        data = bytes(self._prefix)
        if self.encoding == "FLAC":
            off, first = 4, True
            while off + 4 <= len(data):
                kind, size = data[off] & 0x7F, int.from_bytes(data[off + 1 : off + 4], "big")
                if kind > 6 or (first and (kind != 0 or size != 34)):
                    return False
                first, last = False, data[off] & 0x80
                off += 4 + size
                if last:
                    return off >= len(data)  # no audio frame after the metadata
            return True
        if self.encoding in ("OGG_OPUS", "OGG_VORBIS"):
            off = 0
            while off < len(data):
                page = data[off : off + 27]
                if not b"OggS".startswith(page[:4]) or (len(page) > 4 and page[4] != 0):
                    return False
                if len(page) < 27 or off + 27 + page[26] > len(data):
                    return True  # cut inside a page header
                off += 27 + page[26] + sum(data[off + 27 : off + 27 + page[26]])
            return True
        return False

    def _emit(self, block: np.ndarray) -> None:
        if not self._abandoned.is_set():
            self.loop.call_soon_threadsafe(self.sink, block)

    def _run(self) -> None:
        try:
            self._decode()
        finally:
            _threads.release()
            self.loop.call_soon_threadsafe(self._room.set)

    def _decode(self) -> None:
        fmt = STREAM_FORMATS[self.encoding]
        try:
            container = av.open(
                self._pipe, mode="r", format=fmt, options={"probesize": "4096", "analyzeduration": "0"}
            )
        except (av.error.FFmpegError, ValueError, OSError) as exc:
            if self._pipe.ended and not self._abandoned.is_set() and self._cut_short():
                # The stream ended (half-close) before its header could be read whole: a stream that
                # began right (see feed) and was cut short, e.g. a hang-up. No audio: OK, no results.
                log.debug("%s stream ended after %d bytes, before any audio", self.encoding, self._bytes)
                self.loop.call_soon_threadsafe(self._finish_ok)
                return
            detail = (
                f"no valid {self.encoding} header in its {self._bytes} bytes"
                if self._pipe.ended
                else getattr(exc, "strerror", None) or exc
            )
            self._error(
                InvalidInput(
                    f"the stream is not {self.encoding} audio ({detail})",
                    reason="UNDECODABLE_AUDIO",
                    field="audio_content",
                )
            )
            return
        try:
            with container:
                if not container.streams.audio:
                    raise InvalidInput(
                        "the stream has no audio track", reason="NO_AUDIO_STREAM", field="audio_content"
                    )
                stream = container.streams.audio[0]
                try:
                    codec = check_stream(stream, self.encoding)
                except ServiceError as exc:
                    raise exc.relocated({"content": "audio_content"}) from None
                if codec not in CODECS:
                    raise InvalidInput(
                        f"unsupported codec {codec!r} in the stream",
                        reason="UNSUPPORTED_CODEC",
                        field="audio_content",
                    )
                resampler = Resampler(self.limits, field="audio_content")
                for packet in container.demux(stream):
                    if self._abandoned.is_set():
                        return
                    if packet.size == 0:
                        continue
                    try:
                        frames = packet.decode()
                    except av.error.FFmpegError as exc:
                        log.debug("skipping undecodable packet: %s", exc)
                        continue
                    for frame in frames:
                        for block in resampler.push(frame):
                            self._emit(block)
                for block in resampler.push(None):
                    self._emit(block)
        except ServiceError as exc:
            self._error(exc)
            return
        except AV_ERRORS as exc:
            self._error(
                InvalidInput(
                    f"the {self.encoding} stream is corrupt: {exc}",
                    reason="CORRUPT_AUDIO",
                    field="audio_content",
                )
            )
            return
        except Exception:  # a bug: end the stream with INTERNAL rather than leave it waiting forever
            log.exception("stream decoder failed")
            self._error(
                Internal("the stream decoder failed; report it with the request id", reason="INTERNAL")
            )
            return
        self.loop.call_soon_threadsafe(self._finish_ok)

    def _error(self, exc: BaseException) -> None:
        if not self._abandoned.is_set():
            self.loop.call_soon_threadsafe(self._fail, exc)
        # Drain whatever the writer still sends so it never blocks.
        self._abandoned.set()


def make_decoder(
    encoding: str,
    sample_rate: int,
    channels: int,
    limits: Limits,
    sink: AudioSink,
    loop: asyncio.AbstractEventLoop,
) -> StreamDecoder:
    if encoding == "LINEAR16":
        return PcmStreamDecoder(sink, loop, sample_rate, channels or 1, limits)
    if encoding in STREAM_FORMATS:
        return ContainerStreamDecoder(sink, loop, encoding, limits)
    raise InvalidInput(
        f"encoding {encoding or 'AUDIO_ENCODING_UNSPECIFIED'} is not supported for streaming; use one of "
        f"{', '.join(STREAM_ENCODINGS)}",
        reason="UNSUPPORTED_ENCODING",
        field="streaming_config.config.encoding",
    )
