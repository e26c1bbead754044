"""faster-whisper behind a small, blocking API. No grpc here; callers run it off the event loop."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass

import numpy as np

from services.shared.domain import (
    MAX_WINDOW_SECONDS,
    SAMPLE_RATE,
    DecodeOptions,
    Segment,
    WindowResult,
    Word,
)
from services.shared.errors import InvalidInput
from services.transcriber.config import TranscriberSettings, model_label, resolve_model

log = logging.getLogger("transcriber.engine")

FALLBACK_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


@dataclass(slots=True)
class WindowRequest:
    audio: np.ndarray  # float32 mono 16 kHz, at most 30 s
    options: DecodeOptions


class Engine:
    """Loads the model once; transcribes windows of at most 30 s."""

    def __init__(self, settings: TranscriberSettings) -> None:
        self.settings = settings
        self.model_name = model_label(settings.model)
        self.served_by = f"{socket.gethostname()}:{os.getpid()}"
        self._model: object | None = None
        self._loaded = threading.Event()
        self.load_seconds = 0.0

    @property
    def ready(self) -> bool:
        return self._loaded.is_set()

    def load(self) -> None:
        from faster_whisper import WhisperModel

        start = time.perf_counter()
        s = self.settings
        path = resolve_model(s.model)
        log.info("loading model %s from %s (%s, %s)", self.model_name, path, s.device, s.compute_type)
        self._model = WhisperModel(
            path,
            device=s.device,
            device_index=s.device_index,
            compute_type=s.compute_type,
            cpu_threads=s.threads(),
            num_workers=s.num_workers,
            download_root=s.model_cache_dir,
            local_files_only=s.model_local_only,
        )
        if s.warmup:
            t = np.arange(SAMPLE_RATE, dtype=np.float32) / SAMPLE_RATE
            tone = (0.05 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
            self.transcribe(WindowRequest(tone, DecodeOptions(word_timestamps=True)))
        self.load_seconds = time.perf_counter() - start
        self._loaded.set()
        log.info("model ready in %.2fs", self.load_seconds)

    @property
    def multilingual(self) -> bool:
        return bool(getattr(getattr(self._model, "model", None), "is_multilingual", False))

    def validate(self, opts: DecodeOptions) -> None:
        from faster_whisper.tokenizer import _LANGUAGE_CODES

        lang = opts.language
        if lang:
            if lang not in _LANGUAGE_CODES:
                raise InvalidInput(
                    f"unknown language code {lang!r}; use an ISO-639-1 code such as 'en' or 'de'",
                    reason="UNKNOWN_LANGUAGE",
                    field="config.language_code",
                )
            if self._model is not None and not self.multilingual and lang != "en":
                raise InvalidInput(
                    f"model {self.model_name} is English-only; language {lang!r} needs a multilingual model",
                    reason="LANGUAGE_NOT_SUPPORTED",
                    field="config.language_code",
                )
        if opts.beam_size < 0 or opts.beam_size > 20:
            raise InvalidInput("beam_size must be between 0 and 20", field="config.beam_size")
        if not 0.0 <= opts.temperature <= 1.0:
            raise InvalidInput("temperature must be between 0 and 1", field="config.temperature")

    def transcribe(self, req: WindowRequest) -> WindowResult:
        """One window. Blocking: call it from a worker thread."""
        model = self._model
        if model is None:
            raise RuntimeError("model not loaded")
        opts = req.options
        audio = req.audio
        if audio.shape[0] > int((MAX_WINDOW_SECONDS + 0.5) * SAMPLE_RATE):
            raise InvalidInput(f"window is {audio.shape[0] / SAMPLE_RATE:.1f}s; the maximum is 30s")
        if opts.temperature_fallback and opts.temperature == 0.0:
            temperature: float | tuple[float, ...] = FALLBACK_TEMPERATURES
        else:
            temperature = opts.temperature
        language = opts.language or ("en" if not self.multilingual else None)
        segments_iter, info = model.transcribe(  # type: ignore[attr-defined]
            audio,
            language=language,
            beam_size=opts.beam_size or self.settings.beam_size,
            temperature=temperature,
            initial_prompt=opts.initial_prompt or None,
            prefix=opts.prefix or None,
            word_timestamps=opts.word_timestamps,
            condition_on_previous_text=False,
            vad_filter=False,
            without_timestamps=False,
        )
        segments = [
            Segment(
                start=round(float(s.start), 3),
                end=round(float(s.end), 3),
                text=s.text.strip(),
                words=[
                    Word(
                        w.word.strip(), round(float(w.start), 3), round(float(w.end), 3), float(w.probability)
                    )
                    for w in (s.words or [])
                ],
                avg_logprob=float(s.avg_logprob),
                no_speech_prob=float(s.no_speech_prob),
                compression_ratio=float(s.compression_ratio),
            )
            for s in segments_iter
            if s.text.strip()
        ]
        return WindowResult(
            segments=segments,
            language=info.language,
            language_probability=float(info.language_probability),
            duration=round(audio.shape[0] / SAMPLE_RATE, 3),
            served_by=self.served_by,
        )

    def transcribe_batch(self, reqs: list[WindowRequest]) -> list[WindowResult | BaseException]:
        """Several windows in one go; a failing window does not fail the others."""
        out: list[WindowResult | BaseException] = []
        for req in reqs:
            try:
                res = self.transcribe(req)
                res.batch_size = len(reqs)
                out.append(res)
            except Exception as exc:
                out.append(exc)
        return out
