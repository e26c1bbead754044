"""Gateway settings (env STT_*)."""

from __future__ import annotations

from services.shared.config import CommonSettings


class GatewaySettings(CommonSettings):
    gateway_port: int = 50051
    # Transcribers: comma-separated host:port entries, DNS names (re-resolved; every address is
    # used) or file:/path listing one host:port per line.
    transcriber_address: str = "127.0.0.1:50052"
    transcriber_refresh_seconds: float = 5.0
    # Deadline for one window at a transcriber (includes waiting in its queue).
    transcriber_timeout_seconds: float = 120.0
    # Recognize limits: bytes in one request, decoded audio duration.
    max_recognize_bytes: int = 32 * 1024 * 1024
    max_recognize_seconds: float = 900.0
    # Windows of one request sent to the pool at once.
    max_parallel_windows: int = 16
    # Audio decodes running at once (each holds up to max_recognize_seconds of samples).
    max_concurrent_decodes: int = 4
    # Voice activity detection used to cut audio at pauses.
    vad_threshold: float = 0.35
    vad_min_silence_ms: int = 300
    vad_speech_pad_ms: int = 200
