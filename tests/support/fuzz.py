"""Seed recordings of every supported container and the mutations the fuzz tests apply to them.

Seeds are real speech (espeak-ng, 1.5 s) encoded by PyAV into each container and codec the gateway
accepts (and a few it refuses). Mutations are what breaks real uploads and what an attacker tries:
bit flips, truncation, corrupted headers, sizes and counts that lie (RIFF/data sizes, channel
counts, sample rates, format tags, FLAC STREAMINFO, MP4 box sizes, EBML sizes, OGG page fields),
spliced and repeated spans, and appended garbage.
"""

from __future__ import annotations

import functools
import io
import struct
from collections.abc import Callable

import av
import numpy as np

from tests.support import audio

Mutation = Callable[[bytes, "Rng"], bytes]


class Rng:
    """The random choices of one mutation, drawn by Hypothesis (so failures shrink and replay)."""

    def __init__(self, draw: Callable[[int, int], int]) -> None:
        self.draw = draw

    def int(self, lo: int, hi: int) -> int:
        return self.draw(lo, hi)

    def pos(self, data: bytes, head: int | None = None) -> int:
        hi = len(data) - 1 if head is None else min(len(data), head) - 1
        return self.int(0, max(hi, 0))


def _encode(samples: np.ndarray, container: str, codec: str, rate: int, layout: str = "mono",
            options: dict[str, str] | None = None) -> bytes:  # fmt: skip
    """Encode with any PyAV encoder, converting to the sample format it takes."""
    pcm = audio._to_s16(audio.resample(samples, audio.SR, rate))
    if layout == "stereo":
        pcm = np.repeat(pcm, 2)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=rate, layout=layout)
        if options:
            stream.codec_context.options = options
        sample_fmt = stream.codec_context.codec.audio_formats[0].name
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout=layout)
        frame.sample_rate = rate
        fifo = av.AudioFifo()
        resampler = av.AudioResampler(format=sample_fmt, layout=layout, rate=rate)
        for f in [*resampler.resample(frame), *resampler.resample(None)]:
            fifo.write(f)
        size = stream.codec_context.frame_size or 1024
        frames = []
        while fifo.samples >= size:
            frames.append(fifo.read(size))
        rest = fifo.read()
        for f in [*frames, *([rest] if rest is not None else []), None]:
            for packet in stream.encode(f):
                out.mux(packet)
    return buf.getvalue()


@functools.cache
def seeds() -> dict[str, bytes]:
    """name -> file bytes. Names are container.codec."""
    speech = audio.speak("Go forward ten meters.")[: int(1.5 * audio.SR)]
    s = speech.astype(np.float32)
    out = {
        "wav.s16": audio.encode(s, "wav"),
        "wav.s16.stereo48k": audio.encode(s, "wav", rate=48000, channels=2),
        "wav.f32": _encode(s, "wav", "pcm_f32le", 16000),
        "wav.mulaw": _encode(s, "wav", "pcm_mulaw", 8000),
        "wav.alaw": _encode(s, "wav", "pcm_alaw", 8000),
        "wav.u8": _encode(s, "wav", "pcm_u8", 11025),
        "flac": audio.encode(s, "flac"),
        "mp3": audio.encode(s, "mp3"),
        "ogg.opus": audio.encode(s, "ogg"),
        "ogg.vorbis": _encode(s, "ogg", "vorbis", 44100, "stereo", {"strict": "experimental"}),
        "webm.opus": audio.encode(s, "webm"),
        "m4a.aac": audio.encode(s, "m4a"),
        "m4a.alac": _encode(s, "ipod", "alac", 16000),
        "aac.adts": _encode(s, "adts", "aac", 16000),
        "aiff": audio.encode(s, "aiff"),  # a real format outside the allow-list
    }
    return out


@functools.cache
def raw_pcm() -> bytes:
    return audio.encode(audio.speak("Stop.")[: audio.SR], "raw")


# -- mutations ------------------------------------------------------------------------------------


def flip_bits(data: bytes, r: Rng) -> bytes:
    b = bytearray(data)
    for _ in range(r.int(1, 8)):
        if b:
            b[r.pos(data)] ^= 1 << r.int(0, 7)
    return bytes(b)


def flip_header_bytes(data: bytes, r: Rng) -> bytes:
    b = bytearray(data)
    for _ in range(r.int(1, 6)):
        if b:
            b[r.pos(data, head=128)] = r.int(0, 255)
    return bytes(b)


def truncate(data: bytes, r: Rng) -> bytes:
    return data[: r.int(0, max(len(data) - 1, 0))]


def truncate_head(data: bytes, r: Rng) -> bytes:
    return data[: r.int(1, min(len(data), 200))]


def drop_span(data: bytes, r: Rng) -> bytes:
    a = r.pos(data)
    return data[:a] + data[a + r.int(1, 4096) :]


def repeat_span(data: bytes, r: Rng) -> bytes:
    a = r.pos(data)
    span = data[a : a + r.int(1, 2048)]
    return data[:a] + span * r.int(2, 8) + data[a:]


def append_garbage(data: bytes, r: Rng) -> bytes:
    return data + bytes(r.int(0, 255) for _ in range(r.int(1, 512)))


def splice_other(data: bytes, r: Rng) -> bytes:
    """The head of this file glued to the body of another container."""
    others = list(seeds().values())
    other = others[r.int(0, len(others) - 1)]
    cut = r.pos(data, head=256)
    return data[:cut] + other[r.pos(other) :]


def _put(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    size = struct.calcsize(fmt)
    if offset + size > len(data):
        return data
    return data[:offset] + struct.pack(fmt, value) + data[offset + size :]


LIES = [0, 1, 2, 0x7F, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF]


def lie_in_field(data: bytes, r: Rng) -> bytes:
    """Overwrite a size/count field the container's header declares with an extreme value."""
    value = LIES[r.int(0, len(LIES) - 1)]
    if data[:4] == b"RIFF":
        # RIFF size, fmt tag, channels, rate, byte rate, block align, bits, data size
        fields = [(4, "<I"), (20, "<H"), (22, "<H"), (24, "<I"), (28, "<I"), (32, "<H"), (34, "<H")]
        data_at = data.find(b"data")
        if data_at >= 0:
            fields.append((data_at + 4, "<I"))
        off, fmt = fields[r.int(0, len(fields) - 1)]
        return _put(data, off, fmt, value & (0xFFFF if fmt == "<H" else 0xFFFFFFFF))
    if data[:4] == b"fLaC":
        # STREAMINFO: block sizes, frame sizes, then rate(20) | channels-1(3) | bps-1(5) | samples(36)
        off = r.int(8, 8 + 33)
        return _put(data, off, ">B", value & 0xFF)
    if data[4:8] in (b"ftyp", b"moov", b"mdat") or b"moov" in data[:4096]:
        boxes = [
            i - 4
            for i in range(len(data) - 4)
            if data[i : i + 4]
            in (b"moov", b"trak", b"mdia", b"stsd", b"stsz", b"stco", b"mdat", b"mp4a", b"alac", b"esds")
        ]
        if boxes:
            return _put(data, boxes[r.int(0, len(boxes) - 1)], ">I", value)
    if data[:4] == b"OggS":
        pages = [i for i in range(len(data) - 27) if data[i : i + 4] == b"OggS"]
        page = pages[r.int(0, len(pages) - 1)]
        off = page + [5, 6, 14, 18, 26][r.int(0, 4)]  # flags, granule, serial, seqno, segments
        return _put(data, off, "<B", value & 0xFF)
    if data[:4] == b"\x1a\x45\xdf\xa3":  # EBML: corrupt a size byte after an element id
        return flip_header_bytes(data, r)
    return flip_header_bytes(data, r)


MUTATIONS: list[Mutation] = [
    flip_bits, flip_header_bytes, truncate, truncate_head, drop_span, repeat_span, append_garbage,
    splice_other, lie_in_field, lie_in_field,
]  # fmt: skip


def wav_with(tag: int = 1, channels: int = 1, rate: int = 16000, bits: int = 16, n: int = 1600) -> bytes:
    """A hand-made RIFF WAVE header (any format tag, channel count, rate) over `n` frames of noise."""
    block = max(1, channels * bits // 8)
    body = np.random.default_rng(0).integers(0, 255, n * block, dtype=np.uint8).tobytes()
    fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * block & 0xFFFFFFFF, block & 0xFFFF, bits)
    chunks = b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(body)) + body
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks


# Files the fuzz run found bugs with (kept as regression cases).
KNOWN_BAD = {
    "wav.tag_0x1234": wav_with(tag=0x1234),
    "wav.255_channels": wav_with(channels=255, n=64),
    "wav.huge_rate": wav_with(rate=0x7FFFFFFF, n=64),
    "wav.rate_1": wav_with(rate=1, n=64),
    "wav.zero_channels": wav_with(channels=0),
    "wav.float_tag_8bit": wav_with(tag=3, bits=8),
    "wav.32_channels": wav_with(channels=32, n=64),
}


def known_bad() -> dict[str, bytes]:
    out = dict(KNOWN_BAD)
    webm = seeds()["webm.opus"]
    out["webm.codec_A_XXXX"] = webm.replace(b"A_OPUS", b"A_XXXX")
    return out
