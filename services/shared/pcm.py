"""16-bit PCM <-> float32 samples: the one conversion every service uses (numpy, no grpc)."""

from __future__ import annotations

import numpy as np


def to_pcm16(audio: np.ndarray) -> bytes:
    """float32 samples in [-1, 1] (clipped) -> little-endian signed 16-bit PCM bytes."""
    return (np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


def from_pcm16(pcm: bytes | np.ndarray) -> np.ndarray:
    """Little-endian signed 16-bit PCM (bytes, or an int16 array such as a memory map) -> float32."""
    ints = np.frombuffer(pcm, dtype="<i2") if isinstance(pcm, bytes | bytearray | memoryview) else pcm
    return np.asarray(ints, dtype=np.float32) / 32768.0
