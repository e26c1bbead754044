"""The LocalAgreement baseline: ufal/whisper_streaming, run from a checkout (never vendored here).

    git clone https://github.com/ufal/whisper_streaming /tmp/whisper_streaming
    WHISPER_STREAMING_DIR=/tmp/whisper_streaming python -m bench --only whisper_streaming

whisper_online.py imports librosa and soundfile at module level, but the code paths used here (an
in-memory numpy buffer and the faster-whisper backend) need neither. If they are not installed, tiny
stand-ins are put in sys.modules before the import: `librosa.load` decodes with PyAV (already a
dependency), `soundfile.write` writes 16-bit WAV with the stdlib. No heavy dependency is added.
Its FasterWhisperASR loads the model on CUDA; a subclass here returns our CPU int8 model instead.
"""

from __future__ import annotations

import importlib
import io
import os
import sys
import time
import types
import wave
from typing import Any

import numpy as np

from bench.corpus import Clip
from services.shared.pcm import to_pcm16

MIN_CHUNK = float(os.environ.get("BENCH_WS_MIN_CHUNK", "1.0"))  # whisper_online.py's default --min-chunk-size
SR = 16_000


def checkout() -> str | None:
    where = os.environ.get("WHISPER_STREAMING_DIR", "")
    if where and os.path.isfile(os.path.join(where, "whisper_online.py")):
        return os.path.abspath(where)
    return None


def _librosa_shim() -> types.ModuleType:
    mod = types.ModuleType("librosa")

    def load(path: Any, sr: int = SR, dtype: Any = np.float32, **_: Any) -> tuple[np.ndarray, int]:
        import av

        out = []
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sr)
        with av.open(path) as container:
            for frame in container.decode(audio=0):
                out += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
            out += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
        audio = np.concatenate(out) if out else np.zeros(0, dtype=np.float32)
        return audio.astype(dtype), sr

    mod.load = load  # type: ignore[attr-defined]
    mod.__bench_shim__ = True  # type: ignore[attr-defined]
    return mod


def _soundfile_shim() -> types.ModuleType:
    mod = types.ModuleType("soundfile")

    def write(file: Any, data: np.ndarray, samplerate: int, **_: Any) -> None:
        pcm = to_pcm16(np.asarray(data, dtype=np.float32))
        target: Any = file if isinstance(file, io.IOBase) else str(file)
        with wave.open(target, "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(samplerate)
            w.writeframes(pcm)

    mod.write = write  # type: ignore[attr-defined]
    mod.__bench_shim__ = True  # type: ignore[attr-defined]
    return mod


def import_whisper_online(where: str) -> tuple[Any, list[str]]:
    """Import whisper_online from the checkout; returns (module, names of the shims installed)."""
    shims = []
    for name, make in (("librosa", _librosa_shim), ("soundfile", _soundfile_shim)):
        try:
            importlib.import_module(name)
        except ImportError:
            sys.modules[name] = make()
            shims.append(name)
    if where not in sys.path:
        sys.path.insert(0, where)
    import logging

    logging.getLogger("whisper_online").setLevel(logging.WARNING)
    return importlib.import_module("whisper_online"), shims


def run(where: str, model: Any, clip: Clip, timeout: float) -> dict[str, Any]:
    """Simulate live audio: every MIN_CHUNK s of wall time, insert what has 'arrived' and call
    process_iter (blocking, like whisper_online.py's own simulation); time each committed word."""
    from tests.support.text import wer

    wo, shims = import_whisper_online(where)

    class CpuFasterWhisperASR(wo.FasterWhisperASR):  # type: ignore[name-defined]
        def load_model(self, modelsize: Any = None, cache_dir: Any = None, model_dir: Any = None) -> Any:
            return model

    devnull = open(os.devnull, "w")  # noqa: SIM115
    try:
        asr = CpuFasterWhisperASR("en", modelsize="bundled", logfile=devnull)
        online = wo.OnlineASRProcessor(asr, None, buffer_trimming=("segment", 15), logfile=devnull)
        asr.transcribe(clip.samples[:SR])  # warm-up, as whisper_online.py does
        audio = clip.samples
        duration = clip.seconds
        latencies: list[float] = []
        words: list[str] = []
        seen = 0
        iters = 0
        compute = 0.0
        start = time.perf_counter()
        beg = end = 0.0
        timed_out = False
        while True:
            now = time.perf_counter() - start
            if now < end + MIN_CHUNK:
                time.sleep(end + MIN_CHUNK - now)
            end = min(time.perf_counter() - start, duration)
            online.insert_audio_chunk(audio[int(beg * SR) : int(end * SR)])
            beg = end
            t = time.perf_counter()
            online.process_iter()
            arrival = time.perf_counter()
            compute += arrival - t
            iters += 1
            for _b, e, w in online.commited[seen:]:
                latencies.append(arrival - (start + min(e, end)))
                words.append(w)
            seen = len(online.commited)
            if end >= duration:
                break
            if arrival - start > timeout:
                timed_out = True
                break
        # What is left uncommitted is flushed at the end of the stream.
        arrival = time.perf_counter()
        for _b, e, w in online.transcript_buffer.complete():
            latencies.append(arrival - (start + min(e, duration)))
            words.append(w)
        online.finish()
        wall = time.perf_counter() - start
    finally:
        devnull.close()
    text = "".join(words)
    return {
        "min_chunk_seconds": MIN_CHUNK,
        "shims": shims,
        "iterations": iters,
        "compute_seconds": round(compute, 2),
        "wall_seconds": round(wall, 2),
        "lag_seconds": round(wall - duration, 2),
        "timed_out": timed_out,
        "words": len(words),
        "text": text.strip(),
        "wer": round(100 * wer(clip.text, text), 2),
        "latencies": latencies,
    }
