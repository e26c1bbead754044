"""Public request messages -> domain values (protobuf, no grpc)."""

from __future__ import annotations

from services.shared.domain import DecodeOptions, Segment
from services.shared.errors import InvalidInput
from stt.v1 import common_pb2, speech_pb2


def encoding_name(cfg: common_pb2.RecognitionConfig) -> str:
    """'' for auto-detection, else the enum name (LINEAR16, FLAC, ...)."""
    if cfg.encoding == common_pb2.AUDIO_ENCODING_UNSPECIFIED:
        return ""
    return common_pb2.AudioEncoding.Name(cfg.encoding)


def validate_language(code: str | None, field: str = "config.language_code") -> None:
    """Refuse language codes Whisper does not know (the transcriber also checks what its model can do)."""
    from faster_whisper.tokenizer import _LANGUAGE_CODES

    if code and code.strip().lower() not in _LANGUAGE_CODES:
        raise InvalidInput(
            f"unknown language code {code!r}; use an ISO-639-1 code such as 'en'",
            reason="UNKNOWN_LANGUAGE",
            field=field,
        )


def decode_options(cfg: common_pb2.RecognitionConfig) -> DecodeOptions:
    return DecodeOptions(
        language=cfg.language_code.strip().lower() or None,
        beam_size=cfg.beam_size,
        initial_prompt=cfg.initial_prompt or None,
        word_timestamps=cfg.enable_word_time_offsets,
        temperature=cfg.temperature,
    )


def result_from_segment(
    seg: Segment, *, language: str, words: bool, is_final: bool = True, stability: float = 1.0
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
    )
