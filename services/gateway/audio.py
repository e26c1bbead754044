"""Audio decoding with hard limits. No grpc here.

Everything becomes 16 kHz mono float32. Limits are enforced before and *while* decoding: a
format allow-list, a maximum input size, and a maximum decoded duration counted frame by frame, so
a small file that expands to hours of audio is refused after decoding at most the limit.
"""

from __future__ import annotations

import io
import logging
import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import av
import av.error
import numpy as np

from services.shared.domain import SAMPLE_RATE
from services.shared.errors import InvalidInput, LimitExceeded, ServiceError
from services.shared.metrics import DECODE_REJECTIONS
from services.shared.pcm import from_pcm16, to_pcm16

log = logging.getLogger("gateway.audio")

# ffmpeg demuxer names we accept, with the encodings they stand for.
CONTAINERS: dict[str, str] = {
    "wav": "WAV",
    "flac": "FLAC",
    "mp3": "MP3",
    "ogg": "OGG",
    "matroska,webm": "WEBM",
    "mov,mp4,m4a,3gp,3g2,mj2": "MP4",
    "aac": "AAC",
}
CODECS = {
    "pcm_s16le", "pcm_s16be", "pcm_s24le", "pcm_s32le", "pcm_f32le", "pcm_f64le", "pcm_u8",
    "pcm_mulaw", "pcm_alaw", "flac", "mp3", "mp3float", "opus", "vorbis", "aac", "alac",
}  # fmt: skip
# Formats whose header states the true length, so a shortfall means the file was cut off.
HEADER_DURATION = {"wav", "flac", "mov,mp4,m4a,3gp,3g2,mj2"}
# Declared encoding -> the demuxers that may carry it.
ENCODING_CONTAINERS: dict[str, set[str]] = {
    "WAV": {"wav"},
    "FLAC": {"flac", "ogg"},
    "MP3": {"mp3"},
    "OGG_OPUS": {"ogg"},
    "OGG_VORBIS": {"ogg"},
    "WEBM_OPUS": {"matroska,webm"},
    "MP4_AAC": {"mov,mp4,m4a,3gp,3g2,mj2", "aac"},
}
SUPPORTED_TEXT = (
    "WAV, FLAC, MP3, OGG (Opus/Vorbis/FLAC), WebM/Matroska (Opus/Vorbis), M4A/MP4 (AAC/ALAC), AAC"
)
BLOCK_SECONDS = 1.0  # LINEAR16 is resampled in blocks of this size
# What a stream may declare before we try to convert it (beyond: not audio we can use).
MAX_CHANNELS = 16
MIN_RATE, MAX_RATE = 1000, 768_000
# Errors PyAV/FFmpeg raise for bad input (InvalidDataError, ArgumentError, MemoryError, ENOSYS, ...).
# Never AttributeError or TypeError: those are our bugs and stay INTERNAL.
AV_ERRORS = (av.error.FFmpegError, ValueError, MemoryError, OverflowError)


@dataclass(frozen=True, slots=True)
class Limits:
    max_bytes: int
    max_seconds: float


@dataclass(slots=True)
class AudioInfo:
    """What the decoder learned about the source."""

    container: str = "raw"
    codec: str = "pcm_s16le"
    sample_rate: int = 0
    channels: int = 0
    declared_seconds: float | None = None
    seconds: float = 0.0
    length_exact: bool = False  # the header states the true length (a shortfall means cut off)


@dataclass(slots=True)
class DecodedAudio:
    samples: np.ndarray  # float32, mono, 16 kHz
    info: AudioInfo

    @property
    def duration(self) -> float:
        return self.samples.shape[0] / SAMPLE_RATE


def _fmt_seconds(s: float) -> str:
    return f"{s:.0f}s" if s >= 10 else f"{s:.1f}s"


def _too_long(seconds: float, limits: Limits, *, declared: bool) -> LimitExceeded:
    what = "is" if declared else "decodes to more than"
    return LimitExceeded(
        f"audio {what} {_fmt_seconds(seconds)}; the limit is {_fmt_seconds(limits.max_seconds)}",
        reason="AUDIO_TOO_LONG",
        field="content",
        metadata={"limit_seconds": f"{limits.max_seconds:g}"},
    )


def check_size(size: int, limits: Limits) -> None:
    if size == 0:
        DECODE_REJECTIONS.labels("EMPTY_AUDIO").inc()
        raise InvalidInput("audio is empty", reason="EMPTY_AUDIO", field="content")
    if size > limits.max_bytes:
        DECODE_REJECTIONS.labels("AUDIO_TOO_LARGE").inc()
        raise LimitExceeded(
            f"audio is {size} bytes; the limit is {limits.max_bytes} bytes",
            reason="AUDIO_TOO_LARGE",
            field="content",
            metadata={"limit_bytes": str(limits.max_bytes)},
        )


class Resampler:
    """Any frames -> 16 kHz mono float32 ndarrays, counting samples against the limit."""

    def __init__(self, limits: Limits, field: str = "content") -> None:
        self.limits = limits
        self.field = field
        self.max_samples = int(limits.max_seconds * SAMPLE_RATE)
        self.samples = 0
        self._resampler: av.AudioResampler | None = None

    def _new(self) -> av.AudioResampler:
        return av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)

    def _count(self, arr: np.ndarray) -> np.ndarray:
        if not np.isfinite(arr).all():  # float PCM can carry NaN/inf (a corrupt file): silence them
            arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
        self.samples += arr.shape[0]
        if self.samples > self.max_samples:
            raise _too_long(self.samples / SAMPLE_RATE, self.limits, declared=False)
        return arr

    def push(self, frame: av.AudioFrame | None) -> Iterator[np.ndarray]:
        if (
            self._resampler is None
            and frame is not None
            and frame.sample_rate == SAMPLE_RATE
            and frame.format.name == "s16"
            and frame.layout.nb_channels == 1
        ):
            # Already 16 kHz mono 16-bit (the common case for speech WAV): no resampler needed.
            yield self._count(from_pcm16(frame.to_ndarray().reshape(-1)))
            return
        if self._resampler is None:
            if frame is None:
                return
            self._resampler = self._new()
        if frame is not None:
            check_frame(frame, self.field)
        try:
            try:
                out = self._resampler.resample(frame)
            except ValueError:
                # The input changed format mid-stream: flush and start a new resampler.
                out = self._resampler.resample(None)
                self._resampler = self._new()
                out += self._resampler.resample(frame)
        except AV_ERRORS as exc:
            raise InvalidInput(
                f"the audio cannot be converted ({_av_msg(exc)}): its sample format, rate or channel "
                "layout is not usable",
                reason="UNDECODABLE_AUDIO",
                field=self.field,
            ) from None
        for f in out:
            yield self._count(f.to_ndarray().reshape(-1).astype(np.float32, copy=False))


def check_frame(frame: av.AudioFrame, field: str = "content") -> None:
    """Refuse frames no real recording has (a corrupt header can declare 255 channels or a rate of
    2**31) before FFmpeg is asked to convert them."""
    channels = frame.layout.nb_channels
    if not 1 <= channels <= MAX_CHANNELS or not MIN_RATE <= (frame.sample_rate or 0) <= MAX_RATE:
        raise InvalidInput(
            f"the audio declares {channels} channels at {frame.sample_rate} Hz; supported: 1..{MAX_CHANNELS} "
            f"channels at {MIN_RATE}..{MAX_RATE} Hz (the header is corrupt?)",
            reason="UNDECODABLE_AUDIO",
            field=field,
        )


def check_stream(stream: av.AudioStream, fmt: str) -> str:
    """The stream's codec name, once its declared parameters are plausible."""
    ctx = stream.codec_context
    if ctx is None:  # FFmpeg has no decoder for it (e.g. WAV format tag 0x1234, WebM codec A_XXXX)
        raise InvalidInput(
            f"the audio codec in {fmt} is unknown (no decoder for it); supported: {SUPPORTED_TEXT}",
            reason="UNSUPPORTED_CODEC",
            field="content",
        )
    channels, rate = stream.channels or 0, stream.rate or 0
    if channels > MAX_CHANNELS or rate < 0 or rate > MAX_RATE:
        raise InvalidInput(
            f"the {fmt} header declares {channels} channels at {rate} Hz; supported: 1..{MAX_CHANNELS} "
            f"channels at {MIN_RATE}..{MAX_RATE} Hz",
            reason="UNDECODABLE_AUDIO",
            field="content",
        )
    return str(ctx.name)


def iter_container(source: bytes | str | BinaryIO, limits: Limits, encoding: str | None = None,
                   info: AudioInfo | None = None) -> Iterator[np.ndarray]:  # fmt: skip
    """Decode a container file (bytes or a path), yielding 16 kHz mono float32 blocks. Whatever
    FFmpeg raises about the bytes becomes INVALID_ARGUMENT (UNDECODABLE_AUDIO)."""
    try:
        yield from _iter_container(source, limits, encoding, info)
    except AV_ERRORS as exc:
        raise InvalidInput(
            f"could not decode the audio ({_av_msg(exc)}); it is corrupt or not a supported file",
            reason="UNDECODABLE_AUDIO",
            field="content",
        ) from None


def _iter_container(source: bytes | str | BinaryIO, limits: Limits, encoding: str | None = None,
                    info: AudioInfo | None = None) -> Iterator[np.ndarray]:  # fmt: skip
    info = info if info is not None else AudioInfo()
    fileobj = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        container = av.open(fileobj, mode="r", metadata_errors="ignore")
    except (av.error.FFmpegError, ValueError, OSError) as exc:
        raise InvalidInput(
            f"could not read the audio: not a supported audio file or it is corrupt ({_av_msg(exc)}); "
            f"supported: {SUPPORTED_TEXT}, or raw LINEAR16 with a sample rate",
            reason="UNDECODABLE_AUDIO",
            field="content",
        ) from None
    with container:
        fmt = container.format.name
        info.container = fmt
        if fmt not in CONTAINERS:
            raise InvalidInput(
                f"unsupported audio format {fmt!r}; supported: {SUPPORTED_TEXT}",
                reason="UNSUPPORTED_FORMAT",
                field="content",
            )
        if encoding and encoding in ENCODING_CONTAINERS and fmt not in ENCODING_CONTAINERS[encoding]:
            raise InvalidInput(
                f"config.encoding is {encoding} but the content is {CONTAINERS[fmt]} ({fmt})",
                reason="ENCODING_MISMATCH",
                field="config.encoding",
            )
        if not container.streams.audio:
            raise InvalidInput("the file has no audio stream", reason="NO_AUDIO_STREAM", field="content")
        stream = container.streams.audio[0]
        codec = check_stream(stream, fmt)
        info.codec, info.sample_rate, info.channels = codec, stream.rate or 0, stream.channels or 0
        if codec not in CODECS:
            raise InvalidInput(
                f"unsupported audio codec {codec!r} in {fmt}", reason="UNSUPPORTED_CODEC", field="content"
            )
        declared = _declared_seconds(container, stream)
        segment_end: int | None = None
        length_exact = fmt in HEADER_DURATION or (fmt == "mp3" and _mp3_counts_frames(fileobj))
        if fmt == "ogg":
            # FFmpeg reads the last page's granule position: the stream's true end (None when the
            # last page is not this stream's, e.g. chained files).
            length_exact = stream.duration is not None and stream.duration > 0
        elif fmt == "matroska,webm" and not container.streams.video:
            # The Segment's Duration element, when the muxer wrote one (a live recorder does not);
            # with video it may be the video's, longer than the audio. It can be wrong (see below).
            head = _file_head(fileobj)
            mkv = _matroska_duration(head)
            declared, length_exact = (mkv, True) if mkv is not None else (declared, False)
            segment_end = _matroska_segment_end(head)
        if fmt == "wav":
            # The length the data chunk states (also when it starts past the first bytes: large
            # bext, iXML or JUNK chunks before it). None for a WAV written to a pipe (FFmpeg's is
            # then the placeholder's, or what the file holds for some formats): decoded to learn
            # it, nothing to cut short. FFmpeg's where there is no such chunk to read (RF64: its
            # ds64's), as for the other formats.
            size = _size_of(fileobj)
            head = _file_head(fileobj)
            check_wav_tail(fileobj, head, size)
            wav = (
                _find_wav_layout(fileobj, head, size)
                if head[:4] == b"RIFF" and head[8:12] == b"WAVE"
                else None
            )
            if wav is not None and _streamed(wav):
                declared, length_exact = None, False
            elif wav is not None and wav.block and wav.rate:
                declared = wav.data_size / wav.block / wav.rate
        info.declared_seconds = declared
        info.length_exact = length_exact
        if declared is not None and declared > limits.max_seconds + 1.0:
            raise _too_long(declared, limits, declared=True)
        resampler = Resampler(limits)
        errors = packets = 0
        demuxed = _Demuxed()
        for packet in _demux(container, stream, demuxed):
            if packet.size == 0:
                continue
            packets += 1
            try:
                frames = packet.decode()
            except av.error.FFmpegError as exc:
                errors += 1
                log.debug("skipping undecodable packet: %s", _av_msg(exc))
                continue
            for frame in frames:
                yield from resampler.push(frame)
        yield from resampler.push(None)
        info.seconds = resampler.samples / SAMPLE_RATE
        if resampler.samples == 0:
            raise InvalidInput(
                "no audio could be decoded: the file is truncated or corrupt",
                reason="UNDECODABLE_AUDIO",
                field="content",
            )
        if errors and errors > max(2, packets // 20):
            raise InvalidInput(
                f"the audio stream is corrupt: {errors} of {packets} packets could not be decoded",
                reason="CORRUPT_AUDIO",
                field="content",
            )
        if declared is not None and info.length_exact and info.seconds < declared - max(0.5, 0.02 * declared):
            # (Ogg: its last granule position is the true sample count, so a shortfall is enough;
            # its packets' positions are their pages', no evidence of skipped bytes.)
            why = demuxed.stopped_early(_size_of(fileobj), segment_end) if fmt == "matroska,webm" else None
            if fmt == "matroska,webm" and why is None:
                # Every byte was demuxed: the audio decoded is all the file holds, and its Duration
                # is wrong (web apps patch MediaRecorder's WebM with the wall-clock time of the
                # recording, pauses included). Not cut short.
                log.debug("WebM Duration %.1fs, decoded %.1fs from all of it", declared, info.seconds)
                info.length_exact = False
                return
            stated_by = "last page" if fmt == "ogg" else "header"
            raise InvalidInput(
                f"the file is truncated: its {stated_by} says {declared:.1f}s of audio but only "
                f"{info.seconds:.1f}s could be decoded" + (f" ({why})" if why else ""),
                reason="TRUNCATED_AUDIO",
                field="content",
            )


# Bytes of a WebM the demuxer may leave behind without having stopped early: after the last
# packet (Cues, Tags: tens of bytes for a minute, ~20 per cluster), and between two packets (block
# and cluster headers: under 20 bytes).
DEMUX_TAIL_SLACK = 4096  # and 1 % of the file
DEMUX_GAP_SLACK = 1024


class _Demuxed:
    """How far demuxing got through a file: whether the demuxer stopped on an error, where the
    packets ended, and the most bytes it skipped between two packets (resyncing past damage)."""

    def __init__(self) -> None:
        self.error: str | None = None
        self.end = 0
        self.skipped = 0
        self.positions = True  # every packet said where it was
        self._last: int | None = None

    def saw(self, packet: Any) -> None:
        pos = packet.pos
        if pos is None or pos < 0:
            self.positions = False
            return
        if self._last is not None:
            self.skipped = max(self.skipped, pos - self._last)
        self._last = pos + packet.size
        self.end = max(self.end, self._last)

    def stopped_early(self, size: int, stated_end: int | None) -> str | None:
        """Why the demuxer did not get through all `size` bytes of the file (`stated_end`: where
        its outermost element says it ends), or None if it did."""
        if self.error is not None:
            return f"demuxing stopped: {self.error}"
        if stated_end is not None and stated_end > size + 1:
            return f"the file says it is {stated_end} bytes long but is {size}"
        if not self.positions:
            return "packet positions unknown"
        if self.end < size - max(DEMUX_TAIL_SLACK, size // 100):
            return f"demuxing stopped at byte {self.end} of {size}"
        if self.skipped > DEMUX_GAP_SLACK:
            return f"the demuxer skipped {self.skipped} unreadable bytes"
        return None


def _demux(
    container: av.container.InputContainer, stream: av.AudioStream, demuxed: _Demuxed | None = None
) -> Iterator[Any]:
    """The stream's packets; a demuxer error ends them (what was read is still decoded, and the
    truncation and corruption checks judge the result). `demuxed` learns how far it got."""
    packets = container.demux(stream)
    while True:
        try:
            packet = next(packets)
        except StopIteration:
            return
        except av.error.FFmpegError as exc:
            log.debug("demuxing stopped: %s", _av_msg(exc))
            if demuxed is not None:
                demuxed.error = _av_msg(exc)
            return
        if demuxed is not None and packet.size:
            demuxed.saw(packet)
        yield packet


def _declared_seconds(container: av.container.InputContainer, stream: av.AudioStream) -> float | None:
    if stream.duration is not None and stream.time_base is not None and stream.duration > 0:
        return float(stream.duration * stream.time_base)
    if container.duration is not None and container.duration > 0:
        return container.duration / 1_000_000
    return None


_EBML, _SEGMENT, _INFO, _CLUSTER = 0x1A45DFA3, 0x18538067, 0x1549A966, 0x1F43B675
_TIMESTAMP_SCALE, _DURATION = 0x2AD7B1, 0x4489


def _ebml_vint(head: bytes, at: int, keep_marker: bool) -> tuple[int, int] | None:
    """An EBML variable-size integer at `at`: (value, offset after it); a size of all ones is -1
    (unknown size)."""
    if at >= len(head) or head[at] == 0:
        return None
    length = 9 - head[at].bit_length()
    if at + length > len(head):
        return None
    value = int.from_bytes(head[at : at + length], "big")
    if not keep_marker:
        value &= (1 << (7 * length)) - 1
        if value == (1 << (7 * length)) - 1:
            value = -1  # unknown size
    return value, at + length


def _ebml_element(head: bytes, at: int) -> tuple[int, int, int] | None:
    """(id, size, body offset) of the EBML element at `at`."""
    if (ident := _ebml_vint(head, at, True)) is None or (size := _ebml_vint(head, ident[1], False)) is None:
        return None
    return ident[0], size[0], size[1]


def _matroska_segment_end(head: bytes) -> int | None:
    """Where a Matroska/WebM file's Segment ends by the size it states (None: unknown, as a live
    recorder writes it)."""
    if (ebml := _ebml_element(head, 0)) is None or ebml[0] != _EBML:
        return None
    segment = _ebml_element(head, ebml[2] + ebml[1])
    if segment is None or segment[0] != _SEGMENT or segment[1] < 0:
        return None
    return segment[2] + segment[1]


def _matroska_duration(head: bytes) -> float | None:
    """Seconds the Duration element of a Matroska/WebM Segment's Info states (None if there is
    none in the file's first bytes). FFmpeg would estimate a length from the bitrate without one."""

    def element(at: int) -> tuple[int, int, int] | None:  # (id, size, body offset)
        return _ebml_element(head, at)

    at, end, scale, duration = 0, len(head), 1_000_000, None
    while (el := element(at)) is not None:
        ident, size, body = el
        if ident in (_SEGMENT, _INFO):  # go in
            if ident == _INFO:
                end = body + size if size >= 0 else len(head)
            at = body
            continue
        if ident == _CLUSTER or size < 0:
            break  # the Info comes before the first cluster
        if body <= end and body + size <= end:
            if ident == _TIMESTAMP_SCALE and 1 <= size <= 8:
                scale = int.from_bytes(head[body : body + size], "big")
            elif ident == _DURATION and size in (4, 8):
                duration = struct.unpack(">f" if size == 4 else ">d", head[body : body + size])[0]
        at = body + size
        if at >= end and end < len(head):
            break  # the end of Info
    if duration is None or not math.isfinite(duration) or duration <= 0 or scale <= 0:
        return None
    return float(duration) * scale / 1e9


def _mp3_counts_frames(fileobj: str | BinaryIO) -> bool:
    """An MP3 whose first frame is a Xing/Info header with its frame count and byte count, and
    whose size agrees with that byte count (FFmpeg then takes the length from the frame count): its
    length is stated, so a shortfall means it was cut off. Not for a file larger than its header
    says by more than 1/16 (FFmpeg then estimates from the bitrate: trailing tags, concatenated
    files) nor for MP3s without such a header: those cannot tell they were cut off."""
    if isinstance(fileobj, str):
        with open(fileobj, "rb") as fh:
            return _mp3_counts_frames(fh)
    pos = fileobj.tell()
    try:
        fileobj.seek(0, os.SEEK_END)
        total = fileobj.tell()
        fileobj.seek(0)
        head = fileobj.read(10)
        start = 0
        if head[:3] == b"ID3" and len(head) == 10:  # skip an ID3v2 tag (its size is synchsafe)
            size = (head[6] & 0x7F) << 21 | (head[7] & 0x7F) << 14 | (head[8] & 0x7F) << 7 | (head[9] & 0x7F)
            start = 10 + size + (10 if head[5] & 0x10 else 0)
        fileobj.seek(start)
        data = fileobj.read(4096)
    finally:
        fileobj.seek(pos)
    sync = next((i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] & 0xE0 == 0xE0), -1)
    if sync < 0:
        return False
    frame = data[sync : sync + 200]
    at = max(frame.find(b"Xing"), frame.find(b"Info"))
    if at < 0 or len(frame) < at + 16:
        return False
    flags = int.from_bytes(frame[at + 4 : at + 8], "big")
    if flags & 3 != 3:  # both the frame count and the byte count
        return False
    frames = int.from_bytes(frame[at + 8 : at + 12], "big")
    stated = int.from_bytes(frame[at + 12 : at + 16], "big")
    audio = total - start - sync
    return frames > 0 and stated > 0 and audio <= stated + stated // 16


WAV_HEAD_BYTES = 65536  # a WAV's first bytes, read to find its `data` chunk


# A `data` chunk size of 0, or of 2 GiB and more, is a placeholder: the WAV was written where its
# writer could not seek back to fill in the real size (to a pipe: sox writes 0x7FFFF000, others
# 0x7FFFFFFF, 0xFFFFFFFF or 0). Its length is what the file holds. (A real WAV of 2 GiB or more is
# beyond the byte limits; a cut-off one is then taken as it is, and checked against the limits.)
STREAMED_DATA_SIZE = 0x7FFF0000


def _size_of(fileobj: str | BinaryIO) -> int:
    if isinstance(fileobj, str):
        return os.path.getsize(fileobj)
    pos = fileobj.tell()
    try:
        return fileobj.seek(0, os.SEEK_END)
    finally:
        fileobj.seek(pos)


def _file_head(fileobj: str | BinaryIO) -> bytes:
    """A file's first WAV_HEAD_BYTES (the position of an open file is kept)."""
    if isinstance(fileobj, str):
        with open(fileobj, "rb") as fh:
            return fh.read(WAV_HEAD_BYTES)
    pos = fileobj.tell()
    fileobj.seek(0)
    head = fileobj.read(WAV_HEAD_BYTES)
    fileobj.seek(pos)
    return head


def _find_wav_layout(source: bytes | str | BinaryIO, head: bytes, size: int) -> _WavLayout | None:
    """_wav_layout of a whole WAV: from `head` (its first bytes), else walking on through the
    rest of the file's chunk headers (a `data` chunk past the first bytes, after large bext, iXML
    or JUNK chunks). FFmpeg clamps the data size to the file, hiding truncation: read here."""
    wav = _wav_layout(head)
    if wav is not None or len(head) >= size:
        return wav
    if isinstance(source, str):
        with open(source, "rb") as fh:
            return _walk_wav_chunks(fh, size)
    if isinstance(source, bytes):
        return _wav_layout(source)
    pos = source.tell()
    try:
        return _walk_wav_chunks(source, size)
    finally:
        source.seek(pos)


# Chunks walked in a WAV's header or after its data: real files have a handful; a hostile one of
# millions of empty chunks (8 bytes each) would cost a Python loop per chunk, several times a file.
MAX_WAV_CHUNKS = 1024


def _walk_wav_chunks(fh: BinaryIO, size: int) -> _WavLayout | None:
    """_wav_layout over an open file, a chunk header at a time."""
    off, fmt = 12, (0, 0, 0, 0, 0, 0)
    for _ in range(MAX_WAV_CHUNKS):
        if off + 8 > size:
            return None
        fh.seek(off)
        header = fh.read(8)
        if len(header) < 8 or not _chunk_id(header):
            return None
        chunk, length = header[:4], int.from_bytes(header[4:8], "little")
        if chunk == b"fmt " and length >= 16:
            fmt = _parse_fmt(fh.read(min(length, 40)))
        elif chunk == b"data":
            return _wav_of(fmt, off + 8, length)
        off += 8 + length + (length & 1)
    return None


def _streamed(wav: _WavLayout) -> bool:
    return wav.data_size == 0 or wav.data_size >= STREAMED_DATA_SIZE


# Bytes after a WAV's `data` chunk that may be something else than RIFF chunks, a tag or padding
# (a writer's stray bytes) before the header is judged wrong.
WAV_TAIL_SLACK = 4096
_WAV_TAIL_TAGS = (b"ID3", b"TAG", b"APETAGEX")  # tags some programs append to a WAV as they are


def check_wav_tail(source: bytes | str | BinaryIO, head: bytes, size: int) -> None:
    """Refuse a WAV whose `data` chunk says less than the audio that follows it: decoders stop at
    the stated size, so a broken header (100 bytes stated, 89 KB following) would give a few
    milliseconds of audio and an empty transcript as if that were the recording. After the data
    chunk may come RIFF chunks (LIST, id3, cue, ...), a tag, zero padding, or up to WAV_TAIL_SLACK
    other bytes; more than that is CORRUPT_AUDIO. `head`: the file's first bytes; `size`: its size."""
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return
    wav = _find_wav_layout(source, head, size)
    if wav is None or _streamed(wav) or wav.data_start + wav.data_size >= size:
        return
    if isinstance(source, str):
        with open(source, "rb") as fh:
            tail = _wav_tail(fh, wav, size)
    elif isinstance(source, bytes):
        tail = _wav_tail(io.BytesIO(source), wav, size)
    else:
        pos = source.tell()
        try:
            tail = _wav_tail(source, wav, size)
        finally:
            source.seek(pos)
    if tail:
        stated = f"{wav.data_size / wav.block / wav.rate:.3f}s of audio, " if wav.block and wav.rate else ""
        raise InvalidInput(
            f"the WAV header is wrong: its data chunk says {wav.data_size} bytes ({stated}ending at byte "
            f"{wav.data_start + wav.data_size}) but {tail} more bytes that are not RIFF chunks follow it; "
            "fix the header (e.g. ffmpeg -ignore_length 1 -i in.wav out.wav)",
            reason="CORRUPT_AUDIO",
            field="content",
        )


def _wav_tail(fh: BinaryIO, wav: _WavLayout, size: int) -> int:
    """How many bytes after the data chunk are unaccounted for (0 if within the rules above). A
    chunk counts only if it fits in the file (a wild length jumping past the end is not a chunk).
    Some writers leave out the pad byte after an odd-sized chunk: where no chunk id follows one,
    the next chunk is looked for a byte earlier."""
    off = wav.data_start + wav.data_size + (wav.data_size & 1)
    odd = bool(wav.data_size & 1)
    walked = 0
    while off + 8 <= size:
        walked += 1
        if walked > MAX_WAV_CHUNKS:  # the rest is judged as bytes that are no chunks
            break
        fh.seek(off)
        chunk = fh.read(8)
        if odd and not _chunk_id(chunk):
            fh.seek(off - 1)
            if _chunk_id(unpadded := fh.read(8)):
                off, chunk = off - 1, unpadded
        if not _chunk_id(chunk):  # not a chunk id: not a chunk
            break
        length = int.from_bytes(chunk[4:8], "little")
        if off + 8 + length > size:
            break
        odd = bool(length & 1)
        off += 8 + length + (length & 1)
    else:
        return 0  # chunks to the end
    fh.seek(off)
    if size - off <= WAV_TAIL_SLACK or fh.read(8).startswith(_WAV_TAIL_TAGS):
        return 0
    fh.seek(off)
    while block := fh.read(1 << 20):
        if block.strip(b"\0"):
            return size - off
    return 0  # zero padding


def _chunk_id(header: bytes) -> bool:
    """Whether a RIFF chunk header starts with a chunk id (four printable ASCII characters)."""
    return len(header) >= 4 and all(0x20 <= c <= 0x7E for c in header[:4])


@dataclass(frozen=True, slots=True)
class _WavLayout:
    """A RIFF WAVE's `fmt ` fields (0 when no `fmt ` chunk comes before `data`) and where its `data`
    chunk starts and how long its header says it is."""

    tag: int
    channels: int
    rate: int
    bits: int
    block: int
    data_start: int
    data_size: int
    subformat: int = 0  # WAVE_FORMAT_EXTENSIBLE: the format tag its SubFormat GUID holds (-1: another GUID)


_FMT_FIELDS = ((0, 2), (2, 4), (4, 8), (14, 16), (12, 14))  # byte ranges in a `fmt ` chunk's body
_EXTENSIBLE = 0xFFFE
# The bytes of a KSDATAFORMAT_SUBTYPE_* GUID after its first two (the format tag it stands for).
_SUBTYPE_GUID_TAIL = bytes.fromhex("000000001000800000aa00389b71")


def _parse_fmt(body: bytes) -> tuple[int, int, int, int, int, int]:
    """A `fmt ` chunk's body (16 bytes or more): format tag, channels, sample rate, bits per sample,
    block align, and the SubFormat's tag of a WAVE_FORMAT_EXTENSIBLE (else 0)."""
    tag, channels, rate, bits, block = (int.from_bytes(body[a:b], "little") for a, b in _FMT_FIELDS)
    subformat = 0
    if tag == _EXTENSIBLE:
        guid = body[24:40]
        subformat = int.from_bytes(guid[:2], "little") if guid[2:] == _SUBTYPE_GUID_TAIL else -1
    return tag, channels, rate, bits, block, subformat


def _wav_layout(head: bytes) -> _WavLayout | None:
    """The chunks of a WAV's first bytes, walked up to `data` (None: no `data` chunk in them). The
    callers check the RIFF/WAVE magic as they need."""
    off, fmt = 12, (0, 0, 0, 0, 0, 0)
    for _ in range(MAX_WAV_CHUNKS):
        if off + 8 > len(head) or not _chunk_id(head[off : off + 4]):
            return None
        chunk, size = head[off : off + 4], int.from_bytes(head[off + 4 : off + 8], "little")
        body = off + 8
        if chunk == b"fmt " and size >= 16:
            fmt = _parse_fmt(head[body : body + min(size, 40)])
        elif chunk == b"data":
            return _wav_of(fmt, body, size)
        off = body + size + (size & 1)
    return None


def _wav_of(fmt: tuple[int, int, int, int, int, int], data_start: int, data_size: int) -> _WavLayout:
    tag, channels, rate, bits, block, subformat = fmt
    return _WavLayout(tag, channels, rate, bits, block, data_start, data_size, subformat)


def _plain_wav(data: bytes, size: int | None = None) -> tuple[int, int, int, int, bool] | None:
    """(sample rate, channels, data offset, data size, streamed) of a RIFF WAVE of 16-bit integer
    PCM whose data chunk is all there (streamed: the whole frames the file holds, its header not
    saying how many) and whose format LINEAR16 accepts; None for anything else (other encodings, a
    cut-off WAV, odd headers: PyAV decodes and judges those). `data` is the file, or its first
    bytes when `size` says how long the file is."""
    size = len(data) if size is None else size
    if len(data) < 44 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    wav = _wav_layout(data)
    if (
        wav is None
        or wav.tag != 1
        or wav.bits != 16
        or wav.channels not in (1, 2)  # (more channels: FFmpeg's downmix, as before)
        or not 4000 <= wav.rate <= 192_000
        or wav.block != 2 * wav.channels
    ):
        return None
    if _streamed(wav):
        held = size - wav.data_start
        if held < wav.block:
            return None  # no audio at all: FFmpeg says so
        return wav.rate, wav.channels, wav.data_start, held - held % wav.block, True
    if wav.data_size % wav.block or wav.data_start + wav.data_size > size:
        return None
    return wav.rate, wav.channels, wav.data_start, wav.data_size, False


def _plain_wav_info(info: AudioInfo, rate: int, channels: int, size: int, streamed: bool) -> float:
    """Fill `info` for a plain WAV; its seconds."""
    seconds = size / (2 * channels * rate)
    info.container, info.codec, info.sample_rate, info.channels = "wav", "pcm_s16le", rate, channels
    info.declared_seconds, info.length_exact = seconds, not streamed
    return seconds


def _av_msg(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


# Files that LINEAR16 (raw samples, no header) is often mistaken for: (offset, magic, what it is).
# Only signatures no real recording starts with by chance.
_CONTAINER_MAGICS = (
    (0, b"RIFF", "a RIFF file (WAV)"),
    (0, b"RF64", "an RF64 file (WAV)"),
    (0, b"fLaC", "a FLAC file"),
    (0, b"OggS\0", "an Ogg file (Opus, Vorbis or FLAC)"),
    (0, b"\x1a\x45\xdf\xa3", "a WebM/Matroska file"),
    (4, b"ftyp", "an MP4/M4A file"),
    (0, b"FORM", "an IFF file (AIFF)"),
    (0, b"\x89PNG\r\n\x1a\n", "a PNG image"),
)
MAGIC_BYTES = 4096  # enough of a stream's start to see two MP3 frame headers
_MP3_KBPS = (
    (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),  # MPEG-1 layer III
    (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),  # MPEG-2 and 2.5 layer III
)
_MP3_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}


def container_of(head: bytes) -> str | None:
    """What a file starting with `head` is, if it starts with a signature that raw PCM never has
    by chance: a container's magic at its offset, an ID3v2 tag header, or two MPEG audio layer III
    frame headers one frame apart."""
    for at, magic, what in _CONTAINER_MAGICS:
        if head[at : at + len(magic)] == magic:
            return what
    if head[:3] == b"ID3" and len(head) >= 10 and head[3] in (2, 3, 4) and all(b < 0x80 for b in head[6:10]):
        return "an MP3 file (ID3 tag)"
    first = _mp3_frame(head, 0)
    if first is not None and (second := _mp3_frame(head, first[2])) is not None and second[:2] == first[:2]:
        return "an MP3 file"
    return None


def _mp3_frame(head: bytes, at: int) -> tuple[int, int, int] | None:
    """(version, sample rate, frame length) of an MPEG audio layer III frame header at `at`."""
    if at + 4 > len(head) or head[at] != 0xFF or head[at + 1] & 0xE0 != 0xE0:
        return None
    version, layer = (head[at + 1] >> 3) & 3, (head[at + 1] >> 1) & 3
    bitrate, rate_index, padding = head[at + 2] >> 4, (head[at + 2] >> 2) & 3, (head[at + 2] >> 1) & 1
    if version == 1 or layer != 1 or bitrate in (0, 15) or rate_index == 3:
        return None
    rate = _MP3_RATES[version][rate_index]
    kbps = _MP3_KBPS[0 if version == 3 else 1][bitrate]
    return version, rate, (144 if version == 3 else 72) * kbps * 1000 // rate + padding


UNARY_ADVICE = "leave the encoding unspecified to have it detected, or send the file's own encoding"


def check_raw(head: bytes, field: str = "config.encoding", advice: str = UNARY_ADVICE) -> None:
    """LINEAR16 is raw samples: refuse bytes that are plainly a file (ENCODING_MISMATCH), which
    would otherwise be decoded as noise and transcribed as whatever the model makes of it. (A WAV
    of 16-bit PCM is not refused: see linear16_span and Linear16Start.) `advice`: what to do
    instead, for the kind of call."""
    what = container_of(head)
    if what is not None:
        raise InvalidInput(
            f"{field} is LINEAR16 (raw 16-bit samples) but the content is {what}; {advice}",
            reason="ENCODING_MISMATCH",
            field=field,
        )


def is_wav(head: bytes) -> bool:
    """A RIFF or RF64 WAVE file's first 12 bytes."""
    return head[:4] in (b"RIFF", b"RF64") and head[8:12] == b"WAVE"


_WAV_TAGS = {
    1: "PCM",
    2: "MS ADPCM",
    3: "IEEE float",
    6: "A-law",
    7: "mu-law",
    0x11: "IMA ADPCM",
    0x55: "MP3",
}


def _wav_format(wav: _WavLayout) -> str:
    """A WAV's format for a message, e.g. '24-bit PCM, 44100 Hz, 2 channels'."""
    tag = wav.subformat if wav.tag == _EXTENSIBLE else wav.tag
    name = _WAV_TAGS.get(tag, f"format {tag:#06x}")
    bits = f"{wav.bits}-bit " if tag in (1, 3) else ""
    return f"{bits}{name}, {wav.rate} Hz, {wav.channels} channel{'' if wav.channels == 1 else 's'}"


def _is_pcm16(wav: _WavLayout) -> bool:
    pcm = wav.tag == 1 or (wav.tag == _EXTENSIBLE and wav.subformat == 1)
    return pcm and wav.bits == 16 and wav.channels >= 1 and wav.block == 2 * wav.channels


def check_linear16_wav(
    wav: _WavLayout, sample_rate: int, channels: int, field: str, stream_encodings: str | None = None
) -> None:
    """A WAV sent as LINEAR16 is read as its samples when it is 16-bit PCM at the config's sample
    rate and channel count (Google Speech takes LINEAR16 with a WAV header too); any other WAV is
    ENCODING_MISMATCH, saying what to do instead: for Recognize and jobs, to leave the encoding
    unspecified (or give the WAV's rate and channels); for a stream (`stream_encodings`: the
    compressed ones it may use), to give the WAV's rate and channels, strip the header and send
    16-bit samples, or stream a compressed encoding."""
    if _is_pcm16(wav) and wav.rate == sample_rate and wav.channels == channels:
        return
    config = f"{sample_rate} Hz, {channels} channel{'' if channels == 1 else 's'}"
    if _is_pcm16(wav):
        give = f"set sample_rate_hz to {wav.rate} and audio_channel_count to {wav.channels} (the WAV's)"
        advice = (
            f"{give}, or strip the header and send samples at the configured rate and channels"
            if stream_encodings is not None
            else f"{give}, or leave the encoding unspecified to have it detected"
        )
    elif stream_encodings is not None:
        advice = (
            "LINEAR16 carries 16-bit PCM only: convert the audio to it (and strip the header, e.g. "
            "ffmpeg -i in.wav -f s16le -ac 1 -ar 16000 -), or stream a compressed encoding "
            f"({stream_encodings})"
        )
    else:
        advice = "leave the encoding unspecified to have it detected, or send it as WAV"
    raise InvalidInput(
        f"{field} is LINEAR16 ({config}) but the content is a WAV of {_wav_format(wav)}; {advice}",
        reason="ENCODING_MISMATCH",
        field=field,
    )


def linear16_span(fh: BinaryIO, size: int, sample_rate: int, channels: int) -> tuple[int, int, bool]:
    """Where the samples of LINEAR16 content (an open file of `size` bytes) are: (offset, length,
    whether it is a WAV). Raw samples: all of it. A WAV (RIFF or RF64) of 16-bit PCM at the
    config's rate and channels: its data chunk, up to the size it states (the whole rest for the
    placeholder size of a WAV written to a pipe), in whole frames; the header is skipped (it was a
    click at the start). Anything else that starts like a file: ENCODING_MISMATCH."""
    fh.seek(0)
    head = fh.read(WAV_HEAD_BYTES)
    if not is_wav(head):
        check_raw(head[:MAGIC_BYTES])
        return 0, size, False
    wav = _find_wav_layout(fh, head, size)
    if wav is None:
        raise InvalidInput(
            "config.encoding is LINEAR16 and the content is a WAV, but it has no data chunk; leave the "
            "encoding unspecified to have it detected",
            reason="ENCODING_MISMATCH",
            field="config.encoding",
        )
    check_linear16_wav(wav, sample_rate, channels, "config.encoding")
    check_wav_tail(fh, head, size)
    held = max(0, size - wav.data_start)
    length = held if _streamed(wav) else min(wav.data_size, held)
    return wav.data_start, length - length % wav.block, True


class Linear16Start:
    """The start of a LINEAR16 stream, judged as it arrives. Raw samples pass on. A WAV header
    (RIFF or RF64 WAVE) of 16-bit PCM at the stream's rate and channels is dropped up to its data
    chunk, however many messages it spans, and what follows is the samples: to the end of the
    stream when its size is a placeholder (a WAV written live), else as many bytes as it states;
    what comes after them is dropped if it starts as a chunk does (a file's LIST or id3 chunks
    after its audio, which were heard as a click) and heard if not (a writer that stated a wrong
    size). Another WAV, or a file of another
    kind, is ENCODING_MISMATCH on its first bytes. `advice`: what to do instead of another file;
    `stream_encodings`: the compressed streaming encodings, for a WAV's message."""

    _SNIFF, _CHUNKS, _SAMPLES, _DATA, _AFTER, _DROP = 0, 1, 2, 3, 4, 5

    def __init__(
        self, sample_rate: int, channels: int, field: str, advice: str, stream_encodings: str
    ) -> None:
        self.sample_rate, self.channels = sample_rate, channels
        self.field, self.advice, self.stream_encodings = field, advice, stream_encodings
        self._state = self._SNIFF
        self._buf = bytearray()  # bytes held while the start is read (a chunk header, `fmt `)
        self._skip = 0  # bytes of the current chunk still to drop
        self._pad = 0  # 1 after an odd-sized chunk: a pad byte may come
        self._fmt: _WavLayout | None = None
        self._left = 0  # _DATA: bytes of the data chunk still to come

    @property
    def done(self) -> bool:
        """Everything from here on is samples."""
        return self._state == self._SAMPLES

    def feed(self, data: bytes) -> bytes:
        """The samples in `data` (b"" while the header is still being read)."""
        if self._state == self._SAMPLES:
            return data
        if self._state == self._DROP:
            return b""
        if self._state == self._DATA:
            out, self._left = data[: self._left], self._left - min(len(data), self._left)
            if self._left:
                return out
            self._state = self._AFTER
            return out + self.feed(data[len(out) :])
        self._buf += data
        if self._state == self._AFTER:
            if len(self._buf) < 4:
                return b""
            if _chunk_id(bytes(self._buf[:4])):
                self._state, self._buf = self._DROP, bytearray()
                return b""
            return self._samples(0)
        if self._state == self._SNIFF:
            if len(self._buf) < 12:
                return b""
            if not is_wav(bytes(self._buf[:12])):
                check_raw(bytes(self._buf[:MAGIC_BYTES]), self.field, self.advice)
                return self._samples(0)
            self._state = self._CHUNKS
            del self._buf[:12]
        while True:
            if self._skip:
                n = min(self._skip, len(self._buf))
                del self._buf[:n]
                self._skip -= n
            if self._skip or len(self._buf) < 8 + self._pad:
                return b""
            if self._pad:  # the pad byte after an odd-sized chunk (some writers leave it out)
                if not _chunk_id(bytes(self._buf[:4])):
                    del self._buf[:1]
                self._pad = 0
            ident, size = bytes(self._buf[:4]), int.from_bytes(self._buf[4:8], "little")
            if not _chunk_id(ident):
                raise self._corrupt(f"a chunk id of bytes {ident!r}")
            if ident == b"data":
                if self._fmt is None:
                    raise self._corrupt("its data chunk before a `fmt ` chunk")
                if size == 0 or size >= STREAMED_DATA_SIZE:
                    return self._samples(8)
                rest = bytes(self._buf[8:])
                self._state, self._left, self._buf = self._DATA, size, bytearray()
                return self.feed(rest)
            if ident == b"fmt ":
                if not 16 <= size <= 4096:
                    raise self._corrupt(f"a `fmt ` chunk of {size} bytes")
                if len(self._buf) < 8 + size:
                    return b""
                self._fmt = _wav_of(_parse_fmt(bytes(self._buf[8 : 8 + min(size, 40)])), 0, 0)
                check_linear16_wav(
                    self._fmt, self.sample_rate, self.channels, self.field, self.stream_encodings
                )
            self._skip, self._pad = 8 + size, size & 1

    def finish(self) -> bytes:
        """At the end of the stream: bytes still held that are samples (a stream of fewer than 12
        bytes, the last bytes after a data chunk); a WAV header that never reached its data is
        UNDECODABLE_AUDIO (a chunk stating gigabytes had swallowed the stream)."""
        if self._state in (self._SNIFF, self._AFTER):
            return self._samples(0)
        if self._state == self._CHUNKS:
            raise self._corrupt("its header never reached a data chunk")
        return b""

    def _samples(self, skip: int) -> bytes:
        self._state = self._SAMPLES
        out = bytes(self._buf[skip:])
        self._buf = bytearray()
        return out

    def _corrupt(self, what: str) -> InvalidInput:
        return InvalidInput(
            f"the stream starts with a WAV header, but it is corrupt ({what})",
            reason="UNDECODABLE_AUDIO",
            field="audio_content",
        )


def iter_linear16(data: bytes, sample_rate: int, channels: int, limits: Limits) -> Iterator[np.ndarray]:
    """Raw little-endian int16 PCM, interleaved channels -> 16 kHz mono float32 blocks."""
    validate_linear16(sample_rate, channels)
    _check_whole_frames(len(data), channels)
    total = len(data) // (2 * channels)
    if total / sample_rate > limits.max_seconds:
        raise _too_long(total / sample_rate, limits, declared=True)
    decoder = Linear16Decoder(sample_rate, channels, limits)
    yield from decoder.push(data)
    yield from decoder.flush()


def _check_whole_frames(size: int, channels: int) -> None:
    frame_bytes = 2 * channels
    if size % frame_bytes:
        raise InvalidInput(
            f"LINEAR16 content is {size} bytes, not a whole number of {channels}-channel 16-bit "
            f"frames ({frame_bytes} bytes each)",
            reason="PARTIAL_FRAME",
            field="content",
        )


class Linear16Decoder:
    """Incremental LINEAR16 -> 16 kHz mono float32 (for uploads and live streams)."""

    def __init__(self, sample_rate: int, channels: int, limits: Limits) -> None:
        validate_linear16(sample_rate, channels)
        self.sample_rate = sample_rate
        self.channels = channels
        self._resampler = Resampler(limits)
        self._carry = b""
        self._layout = "mono" if channels == 1 else ("stereo" if channels == 2 else f"{channels}c")
        self._block = max(1, int(sample_rate * BLOCK_SECONDS)) * 2 * channels
        self._pts = 0

    def push(self, data: bytes) -> Iterator[np.ndarray]:
        data = self._carry + data
        usable = len(data) - len(data) % (2 * self.channels)
        self._carry = data[usable:]
        for off in range(0, usable, self._block):
            chunk = data[off : min(off + self._block, usable)]
            yield from self._resampler.push(self._frame(chunk))

    def flush(self) -> Iterator[np.ndarray]:
        if self._carry:
            _check_whole_frames(len(self._carry), self.channels)
        yield from self._resampler.push(None)

    def _frame(self, chunk: bytes) -> av.AudioFrame:
        n = len(chunk) // (2 * self.channels)
        pcm = np.frombuffer(chunk, dtype="<i2")
        if self.channels > 2:
            # Mix down here: ffmpeg has no default layout name for every channel count.
            mono = pcm.reshape(n, self.channels).astype(np.int32).mean(axis=1).astype("<i2")
            frame = av.AudioFrame.from_ndarray(mono.reshape(1, -1), format="s16", layout="mono")
        else:
            frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout=self._layout)
        frame.sample_rate = self.sample_rate
        frame.pts = self._pts
        self._pts += n
        return frame


def validate_linear16(sample_rate: int, channels: int) -> None:
    if sample_rate <= 0:
        raise InvalidInput(
            "LINEAR16 audio needs sample_rate_hz (e.g. 16000)",
            reason="MISSING_SAMPLE_RATE",
            field="config.sample_rate_hz",
        )
    if not 4000 <= sample_rate <= 192_000:
        raise InvalidInput(
            f"sample_rate_hz {sample_rate} is out of range (4000..192000)",
            reason="BAD_SAMPLE_RATE",
            field="config.sample_rate_hz",
        )
    if not 1 <= channels <= 8:
        raise InvalidInput(
            f"audio_channel_count {channels} is out of range (1..8)",
            reason="BAD_CHANNEL_COUNT",
            field="config.audio_channel_count",
        )


def iter_source(
    source: bytes | str,
    *,
    limits: Limits,
    encoding: str = "",
    sample_rate: int = 0,
    channels: int = 0,
    info: AudioInfo | None = None,
) -> Iterator[np.ndarray]:
    """Any recording (bytes or a file path) as 16 kHz mono float32 blocks, within the limits."""
    info = info if info is not None else AudioInfo()
    size = len(source) if isinstance(source, bytes) else os.path.getsize(source)
    check_size(size, limits)
    try:
        yield from _iter_checked(source, size, limits, encoding, sample_rate, channels, info)
    except ServiceError as exc:
        DECODE_REJECTIONS.labels(exc.reason).inc()
        raise


def _iter_checked(
    source: bytes | str,
    size: int,
    limits: Limits,
    encoding: str,
    sample_rate: int,
    channels: int,
    info: AudioInfo,
) -> Iterator[np.ndarray]:
    if encoding in ("", "WAV") and isinstance(source, bytes) and (pcm := _plain_wav(source)) is not None:
        # 16-bit PCM WAV, whole (the usual speech file): read as LINEAR16 without opening a
        # container (PyAV's probe alone costs ~4 ms, most of a short Recognize's overhead).
        check_wav_tail(source, source[:WAV_HEAD_BYTES], size)
        rate, channels, start, size, streamed = pcm
        _plain_wav_info(info, rate, channels, size, streamed)
        yield from iter_linear16(source[start : start + size], rate, channels, limits)
        return
    if encoding in ("", "WAV") and isinstance(source, str):
        with open(source, "rb") as fh:
            if (pcm := _plain_wav(head := fh.read(WAV_HEAD_BYTES), size)) is not None:
                check_wav_tail(fh, head, size)
                rate, channels, start, length, streamed = pcm
                if (seconds := _plain_wav_info(info, rate, channels, length, streamed)) > limits.max_seconds:
                    raise _too_long(seconds, limits, declared=True)
                yield from _iter_pcm_file(fh, start, length, rate, channels, limits)
                return
    if encoding != "LINEAR16":
        yield from iter_container(source, limits, encoding or None, info)
        return
    channels = channels or 1
    info.sample_rate, info.channels = sample_rate, channels
    validate_linear16(sample_rate, channels)
    if isinstance(source, bytes):
        start, length, wav = linear16_span(io.BytesIO(source), size, sample_rate, channels)
        if wav:
            info.container = "wav"
        yield from iter_linear16(
            source[start : start + length] if wav else source, sample_rate, channels, limits
        )
        return
    with open(source, "rb") as fh:
        start, length, wav = linear16_span(fh, size, sample_rate, channels)
        if wav:
            info.container = "wav"
        _check_whole_frames(length, channels)
        yield from _iter_pcm_file(fh, start, length, sample_rate, channels, limits)


def _iter_pcm_file(
    fh: BinaryIO, start: int, length: int, rate: int, channels: int, limits: Limits
) -> Iterator[np.ndarray]:
    """`length` bytes of LINEAR16 from `start` in an open file, a MiB at a time."""
    decoder = Linear16Decoder(rate, channels, limits)
    fh.seek(start)
    while length > 0 and (block := fh.read(min(length, 1 << 20))):
        length -= len(block)
        yield from decoder.push(block)
    yield from decoder.flush()


def decode(
    source: bytes | str,
    *,
    limits: Limits,
    encoding: str = "",
    sample_rate: int = 0,
    channels: int = 0,
) -> DecodedAudio:
    """Decode a whole recording (bytes or a file path) into memory, within the limits."""
    info = AudioInfo()
    blocks = list(
        iter_source(
            source, limits=limits, encoding=encoding, sample_rate=sample_rate, channels=channels, info=info
        )
    )
    samples = np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.float32)
    info.seconds = samples.shape[0] / SAMPLE_RATE
    return DecodedAudio(samples, info)


def decode_to_file(
    source: str,
    dest: str | None,
    *,
    limits: Limits,
    encoding: str = "",
    sample_rate: int = 0,
    channels: int = 0,
) -> AudioInfo:
    """Decode a recording into raw 16 kHz mono int16 at `dest` (None: only validate and measure),
    holding one block at a time in memory."""
    info = AudioInfo()
    out = open(dest, "wb") if dest else None  # noqa: SIM115
    samples = 0
    try:
        for block in iter_source(
            source, limits=limits, encoding=encoding, sample_rate=sample_rate, channels=channels, info=info
        ):
            samples += block.shape[0]
            if out is not None:
                out.write(to_pcm16(block))
    finally:
        if out is not None:
            out.close()
    info.seconds = samples / SAMPLE_RATE
    return info


PROBE_SECONDS = 5.0  # decoded from the start of an upload to check it is audio we can use


def probe(
    source: str,
    *,
    limits: Limits,
    encoding: str = "",
    sample_rate: int = 0,
    channels: int = 0,
) -> AudioInfo:
    """Check an upload cheaply, without decoding all of it: the size, the format and codec, the
    declared duration against the limit, the first seconds decode, and (formats whose header states
    the length) that the file is not cut short. The job decodes it once, later, enforcing the same
    limits frame by frame. A file whose length is not declared is decoded in full here (to know it).
    `seconds` is the declared duration."""
    size = os.path.getsize(source)
    check_size(size, limits)
    try:
        if encoding == "LINEAR16":
            channels = channels or 1
            validate_linear16(sample_rate, channels)
            with open(source, "rb") as fh:
                _, length, wav = linear16_span(fh, size, sample_rate, channels)
            _check_whole_frames(length, channels)
            seconds = length / (2 * channels * sample_rate)
            if seconds > limits.max_seconds:
                raise _too_long(seconds, limits, declared=True)
            return AudioInfo("wav" if wav else "raw", "pcm_s16le", sample_rate, channels, seconds, seconds)
        info = _probe_container(source, limits, encoding)
    except ServiceError as exc:
        DECODE_REJECTIONS.labels(exc.reason).inc()
        raise
    if info is None:  # length unknown: decode it all (bounded memory) to measure and check it
        return decode_to_file(
            source, None, limits=limits, encoding=encoding, sample_rate=sample_rate, channels=channels
        )
    return info


def _probe_container(source: str, limits: Limits, encoding: str) -> AudioInfo | None:
    info = AudioInfo()
    blocks = iter_container(source, limits, encoding or None, info)
    got = 0
    for block in blocks:  # opens and checks the container, stream and codec, then decodes
        got += block.shape[0]
        if got >= PROBE_SECONDS * SAMPLE_RATE:
            break
    close = getattr(blocks, "close", None)
    if close is not None:
        close()
    if got < PROBE_SECONDS * SAMPLE_RATE:  # all of it decoded (and checked) within the probe
        info.seconds = got / SAMPLE_RATE
        return info
    declared = info.declared_seconds
    if declared is None:
        return None
    if info.length_exact:
        end = _decodable_end(source, info)
        if end is None:
            return None  # cannot tell cheaply: decode it all
        if end < declared - max(0.5, 0.02 * declared):
            if info.container == "matroska,webm":
                return None  # a WebM's Duration may be wrong: decode it all to tell (see there)
            raise InvalidInput(
                f"the file is truncated: its header says {declared:.1f}s of audio but it ends at {end:.1f}s",
                reason="TRUNCATED_AUDIO",
                field="content",
            )
    info.seconds = declared
    return info


def _decodable_end(source: str, info: AudioInfo) -> float | None:
    """Seconds at which the stream's last decodable packet ends (seeking near the declared end);
    None if that cannot be told without decoding the whole file."""
    declared = info.declared_seconds or 0.0
    if info.container == "wav":
        size = os.path.getsize(source)
        with open(source, "rb") as fh:
            wav = _find_wav_layout(fh, fh.read(WAV_HEAD_BYTES), size)
        if wav is None or not wav.block or not wav.rate:
            return None
        return (size - wav.data_start) / wav.block / wav.rate
    try:
        with av.open(source, mode="r", metadata_errors="ignore") as container:
            stream = container.streams.audio[0]
            if stream.time_base is None:
                return None
            container.seek(int(max(0.0, declared - 3.0) / stream.time_base), stream=stream, any_frame=False)
            end = None
            for packet in _demux(container, stream):
                if packet.pts is None or packet.size == 0:
                    continue
                try:
                    frames = packet.decode()
                except av.error.FFmpegError:
                    continue
                for frame in frames:
                    if frame.pts is not None and frame.sample_rate:
                        t = float(frame.pts * stream.time_base) + frame.samples / frame.sample_rate
                        end = t if end is None else max(end, t)
            return end
    except AV_ERRORS:
        return None
