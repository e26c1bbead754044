"""Public request messages -> validated domain values (protobuf, no grpc).

`validate_config` is the one check of a RecognitionConfig, used by Recognize, StreamingRecognize,
CreateJob and the HTTP front door before any audio is read or spooled. Field paths in errors are
relative to the config (`encoding`, `language_code`, ...) with the caller's prefix in front (e.g.
"config.", "streaming_config.config.", "metadata.config.").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from services.gateway import audio
from services.shared.domain import DecodeOptions, Segment
from services.shared.errors import InvalidInput, ServiceError
from stt.v1 import common_pb2, speech_pb2

MAX_BEAM_SIZE = 20
MAX_PROMPT_CHARS = 1000
MAX_LANGUAGE_CHARS = 16
ENCODING_PREFIX = "AUDIO_ENCODING_"
# Encodings a live stream can be decoded from incrementally.
STREAMING_ENCODINGS = ("LINEAR16", "OGG_OPUS", "OGG_VORBIS", "WEBM_OPUS", "FLAC", "MP3")


@dataclass(frozen=True)
class ModelCaps:
    """What the transcribers' model can do (from their GetInfo); None fields: not known yet."""

    name: str = ""
    multilingual: bool | None = None
    languages: frozenset[str] = field(default_factory=frozenset)


@dataclass(slots=True)
class ValidConfig:
    encoding: str  # "" (detect), "LINEAR16", "FLAC", ... (enum name without its prefix)
    sample_rate: int
    channels: int
    options: DecodeOptions
    word_timestamps: bool


def shown(value: object, limit: int = 40) -> str:
    """A client-supplied value for an error message, cut short (messages go into trailers)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def encoding_name(value: int, field_path: str = "config.encoding") -> str:
    """'' for auto-detection, else the enum name without its prefix (LINEAR16, FLAC, ...)."""
    if value == common_pb2.AUDIO_ENCODING_UNSPECIFIED:
        return ""
    if value not in common_pb2.AudioEncoding.values():
        raise InvalidInput(
            f"unknown encoding {value}; use one of "
            + ", ".join(n for n, v in common_pb2.AudioEncoding.items() if v),
            reason="UNSUPPORTED_ENCODING",
            field=field_path,
        )
    return common_pb2.AudioEncoding.Name(value)[len(ENCODING_PREFIX) :]  # type: ignore[arg-type]


def validate_language(code: str, caps: ModelCaps | None, field_path: str) -> str | None:
    """The normalised language code (None: the model's own or detected)."""
    from faster_whisper.tokenizer import _LANGUAGE_CODES

    if not code:
        return None
    if len(code) > MAX_LANGUAGE_CHARS:
        raise InvalidInput(
            f"language_code is {len(code)} characters; use an ISO-639-1 code such as 'en'",
            reason="UNKNOWN_LANGUAGE",
            field=field_path,
        )
    norm = code.strip().lower()
    if norm not in _LANGUAGE_CODES:
        raise InvalidInput(
            f"unknown language code {shown(code)}; use an ISO-639-1 code such as 'en'",
            reason="UNKNOWN_LANGUAGE",
            field=field_path,
        )
    if caps is not None and caps.multilingual is False and caps.languages and norm not in caps.languages:
        raise InvalidInput(
            f"model {caps.name} is English-only; language {norm!r} needs a multilingual model",
            reason="LANGUAGE_NOT_SUPPORTED",
            field=field_path,
        )
    return norm


def validate_linear16(sample_rate: int, channels: int, prefix: str = "config.") -> None:
    try:
        audio.validate_linear16(sample_rate, channels)
    except ServiceError as exc:
        raise exc.relocated({"config.": prefix}) from None


def validate_config(
    cfg: common_pb2.RecognitionConfig,
    *,
    prefix: str = "config.",
    caps: ModelCaps | None = None,
    streaming: bool = False,
) -> ValidConfig:
    """Check every field of the config, in field order; the first problem is the error."""
    encoding = encoding_name(cfg.encoding, f"{prefix}encoding")
    if streaming and encoding not in STREAMING_ENCODINGS:
        raise InvalidInput(
            f"encoding {encoding or 'AUDIO_ENCODING_UNSPECIFIED'} is not supported for streaming; use one "
            f"of {', '.join(ENCODING_PREFIX + e for e in STREAMING_ENCODINGS)}",
            reason="UNSUPPORTED_ENCODING",
            field=f"{prefix}encoding",
        )
    channels = cfg.audio_channel_count
    if channels < 0 or channels > 8:
        raise InvalidInput(
            f"audio_channel_count {channels} is out of range (0..8)",
            reason="BAD_CHANNEL_COUNT",
            field=f"{prefix}audio_channel_count",
        )
    if encoding == "LINEAR16":
        validate_linear16(cfg.sample_rate_hz, channels or 1, prefix)
    elif cfg.sample_rate_hz < 0:
        raise InvalidInput(
            "sample_rate_hz must not be negative", reason="BAD_SAMPLE_RATE", field=f"{prefix}sample_rate_hz"
        )
    language = validate_language(cfg.language_code, caps, f"{prefix}language_code")
    if not 0 <= cfg.beam_size <= MAX_BEAM_SIZE:
        raise InvalidInput(
            f"beam_size {cfg.beam_size} is out of range (0..{MAX_BEAM_SIZE}; 0: the server default)",
            reason="BAD_CONFIG_VALUE",
            field=f"{prefix}beam_size",
        )
    if len(cfg.initial_prompt) > MAX_PROMPT_CHARS:
        raise InvalidInput(
            f"initial_prompt is {len(cfg.initial_prompt)} characters; the limit is {MAX_PROMPT_CHARS}",
            reason="BAD_CONFIG_VALUE",
            field=f"{prefix}initial_prompt",
        )
    if not math.isfinite(cfg.temperature) or not 0.0 <= cfg.temperature <= 1.0:
        raise InvalidInput(
            f"temperature {cfg.temperature} is out of range (0..1)",
            reason="BAD_CONFIG_VALUE",
            field=f"{prefix}temperature",
        )
    return ValidConfig(
        encoding=encoding,
        sample_rate=cfg.sample_rate_hz,
        channels=channels or (1 if encoding == "LINEAR16" else 0),
        options=DecodeOptions(
            language=language,
            beam_size=cfg.beam_size,
            initial_prompt=cfg.initial_prompt or None,
            word_timestamps=cfg.enable_word_time_offsets,
            temperature=cfg.temperature,
        ),
        word_timestamps=cfg.enable_word_time_offsets,
    )


def decode_options(cfg: common_pb2.RecognitionConfig) -> DecodeOptions:
    """The decoding options of a config that was validated when it was accepted (a stored job's)."""
    return DecodeOptions(
        language=cfg.language_code.strip().lower() or None,
        beam_size=cfg.beam_size,
        initial_prompt=cfg.initial_prompt or None,
        word_timestamps=cfg.enable_word_time_offsets,
        temperature=cfg.temperature,
    )


def result_from_segment(
    seg: Segment,
    *,
    language: str,
    words: bool,
    is_final: bool = True,
    stability: float = 1.0,
    utterance_index: int = 0,
    utterance_end: bool = False,
) -> speech_pb2.SpeechRecognitionResult:
    return speech_pb2.SpeechRecognitionResult(
        transcript=seg.text,
        confidence=seg.confidence,
        words=[
            common_pb2.WordInfo(
                word=w.word, start_seconds=w.start, end_seconds=w.end, probability=w.probability
            )
            for w in seg.words
        ]
        if words
        else [],
        start_seconds=seg.start,
        end_seconds=seg.end,
        is_final=is_final,
        stability=stability,
        language_code=language,
        avg_logprob=seg.avg_logprob,
        no_speech_prob=seg.no_speech_prob,
        utterance_index=utterance_index,
        utterance_end=utterance_end,
    )
