"""16-bit PCM <-> float32 samples: the one conversion every service uses (numpy, no grpc)."""

from __future__ import annotations

import numpy as np


def to_pcm16(audio: np.ndarray) -> bytes:
    """float32 samples in [-1, 1] (clipped) -> little-endian signed 16-bit PCM bytes, rounded to the
    nearest step of from_pcm16's scale, so 16-bit audio goes back and forth unchanged (scaling by
    32767 and truncating took one step off every sample each way: a job's audio, written to the
    spool and sent to a transcriber, lost two)."""
    return pcm16_array(audio).tobytes()


def pcm16_array(audio: np.ndarray) -> np.ndarray:
    """float32 samples -> an int16 array (see to_pcm16)."""
    return np.clip(np.rint(audio * 32768.0), -32768, 32767).astype("<i2")


def from_pcm16(pcm: bytes | np.ndarray) -> np.ndarray:
    """Little-endian signed 16-bit PCM (bytes, or an int16 array such as a memory map) -> float32."""
    ints = np.frombuffer(pcm, dtype="<i2") if isinstance(pcm, bytes | bytearray | memoryview) else pcm
    return np.asarray(ints, dtype=np.float32) / 32768.0
