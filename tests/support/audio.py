"""Test and benchmark audio made here: espeak-ng speaks, PyAV encodes. Cached by content."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import wave
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

SR = 16_000
CACHE = Path(os.environ.get("STT_TEST_AUDIO_CACHE", Path(__file__).resolve().parents[1] / ".cache" / "audio"))

SENTENCES = [
    "The weather today is sunny with a light breeze from the west.",
    "Please remember to bring your umbrella tomorrow because it may rain in the afternoon.",
    "Our team finished the quarterly report two days ahead of schedule.",
    "The library on Main Street opens at nine in the morning and closes at six.",
    "She ordered a cup of coffee and a slice of chocolate cake.",
    "The train to the city leaves from platform four every half hour.",
    "We planted tomatoes, carrots and beans in the garden last spring.",
    "The museum has a new exhibition about the history of flight.",
    "He walked his dog along the river before breakfast.",
    "The children built a sand castle on the beach near the old lighthouse.",
    "Please turn off the lights when you leave the office tonight.",
    "The concert was postponed until next Friday because of the storm.",
    "My brother is learning to play the piano and practices every evening.",
    "The bakery sells fresh bread and warm cinnamon rolls every morning.",
]


@dataclass
class Clip:
    samples: np.ndarray  # float32 mono 16 kHz
    text: str
    # (start seconds, end seconds, sentence) of each spoken sentence
    spans: list[tuple[float, float, str]]

    @property
    def seconds(self) -> float:
        return self.samples.shape[0] / SR


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def speak(text: str, *, voice: str = "en-us", speed: int = 150) -> np.ndarray:
    """espeak-ng -> 16 kHz mono float32 (cached)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"say-{_key(text, voice, speed)}.npy"
    if path.exists():
        return np.load(path)
    wav = subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(speed), "--stdout", text], check=True, capture_output=True
    ).stdout
    samples = resample(*_read_wav(wav), SR)
    np.save(path, samples)
    return samples


def _read_wav(data: bytes) -> tuple[np.ndarray, int]:
    with wave.open(io.BytesIO(data)) as w:
        rate = w.getframerate()
        frames = w.readframes(w.getnframes())
    return np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768.0, rate


def resample(samples: np.ndarray, rate: int, target: int) -> np.ndarray:
    if rate == target:
        return samples.astype(np.float32)
    frame = av.AudioFrame.from_ndarray(_to_s16(samples).reshape(1, -1), format="s16", layout="mono")
    frame.sample_rate = rate
    rs = av.AudioResampler(format="flt", layout="mono", rate=target)
    out = [f.to_ndarray().reshape(-1) for f in rs.resample(frame)]
    out += [f.to_ndarray().reshape(-1) for f in rs.resample(None)]
    return np.concatenate(out).astype(np.float32)


def _to_s16(samples: np.ndarray) -> np.ndarray:
    return (np.clip(samples, -1, 1) * 32767).astype("<i2")


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * SR), dtype=np.float32)


def conversation(
    sentences: list[str], *, pause: float = 0.8, lead: float = 0.5, voices: tuple[str, ...] = ("en-us",),
    speed: int = 150,
) -> Clip:  # fmt: skip
    """Sentences spoken one after another with pauses; knows where each one is."""
    parts = [silence(lead)]
    spans = []
    t = lead
    for i, s in enumerate(sentences):
        audio = speak(s, voice=voices[i % len(voices)], speed=speed)
        spans.append((t, t + audio.shape[0] / SR, s))
        parts += [audio, silence(pause)]
        t += audio.shape[0] / SR + pause
    return Clip(np.concatenate(parts), " ".join(sentences), spans)


def long_clip(min_seconds: float = 70.0) -> Clip:
    sentences: list[str] = []
    i = 0
    while True:
        sentences.append(SENTENCES[i % len(SENTENCES)])
        i += 1
        clip = conversation(sentences, pause=0.9)
        if clip.seconds >= min_seconds:
            return clip


class _Unseekable(io.RawIOBase):
    """A write-only stream the muxer cannot seek back in (as a live recorder's output)."""

    def __init__(self) -> None:
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:  # type: ignore[no-untyped-def, override]
        self.data += bytes(b)
        return len(b)


def encode(
    samples: np.ndarray, fmt: str, *, rate: int = SR, channels: int = 1, seekable: bool = True
) -> bytes:
    """Encode mono float32 16 kHz audio into a container: wav, flac, mp3, ogg (opus), webm, m4a,
    aiff, or raw LINEAR16 (at `rate`, `channels`). `seekable=False`: written as to a pipe (the
    muxer cannot go back to fill in lengths, e.g. WebM's Duration)."""
    src = resample(samples, SR, rate)
    pcm = _to_s16(src)
    if channels > 1:
        pcm = np.repeat(pcm, channels)
    if fmt == "raw":
        return pcm.tobytes()
    codec, container, enc_rate = {
        "wav": ("pcm_s16le", "wav", rate),
        "flac": ("flac", "flac", rate),
        "mp3": ("libmp3lame", "mp3", rate if rate in (16000, 22050, 24000, 32000, 44100, 48000) else 16000),
        "ogg": ("libopus", "ogg", 48000),
        "webm": ("libopus", "webm", 48000),
        "m4a": ("aac", "ipod", rate),
        "aiff": ("pcm_s16be", "aiff", rate),
    }[fmt]
    layout = "mono" if channels == 1 else "stereo"
    buf: io.BytesIO | _Unseekable = io.BytesIO() if seekable else _Unseekable()
    with av.open(buf, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=enc_rate, layout=layout)
        frame_size = 960 * (enc_rate // 48000) if codec == "libopus" else 1024
        for f in _frames(pcm, rate, channels, layout, enc_rate, frame_size):
            for packet in stream.encode(f):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue() if isinstance(buf, io.BytesIO) else bytes(buf.data)


def piped_wav(samples: np.ndarray, *sox_encoding: str) -> bytes:
    """A WAV as sox writes it to a pipe (it cannot seek back to fill in the sizes: its header has
    placeholders). `sox_encoding`: sox's output options, e.g. "-b24" or "-efloat"."""
    return subprocess.run(
        ["sox", "-t", "raw", "-r", str(SR), "-b", "16", "-e", "signed", "-c", "1", "-",
         "-t", "wav", *sox_encoding, "-"],
        input=_to_s16(samples).tobytes(), capture_output=True, check=True,
    ).stdout  # fmt: skip


def _frames(pcm: np.ndarray, rate: int, channels: int, layout: str, enc_rate: int, size: int):  # type: ignore[no-untyped-def]
    frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout=layout)
    frame.sample_rate = rate
    fifo = av.AudioFifo()
    rs = av.AudioResampler(format="s16" if size == 1024 else "flt", layout=layout, rate=enc_rate)
    for f in [*rs.resample(frame), *rs.resample(None)]:
        fifo.write(f)
    while fifo.samples >= size:
        yield fifo.read(size)
    rest = fifo.read()
    if rest is not None:
        yield rest
