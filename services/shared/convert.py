"""Domain <-> protobuf conversions shared by the services (protobuf, no grpc)."""

from __future__ import annotations

from services.shared.domain import DecodeOptions, Segment, WindowResult, Word, WorkClass
from services.shared.internal.v1 import transcriber_pb2
from stt.v1 import common_pb2


def segment_to_proto(seg: Segment) -> common_pb2.Segment:
    return common_pb2.Segment(
        start_seconds=seg.start,
        end_seconds=seg.end,
        text=seg.text,
        words=[
            common_pb2.WordInfo(
                word=w.word, start_seconds=w.start, end_seconds=w.end, probability=w.probability
            )
            for w in seg.words
        ],
        avg_logprob=seg.avg_logprob,
        no_speech_prob=seg.no_speech_prob,
        compression_ratio=seg.compression_ratio,
    )


def segment_from_proto(msg: common_pb2.Segment) -> Segment:
    return Segment(
        start=msg.start_seconds,
        end=msg.end_seconds,
        text=msg.text,
        words=[Word(w.word, w.start_seconds, w.end_seconds, w.probability) for w in msg.words],
        avg_logprob=msg.avg_logprob,
        no_speech_prob=msg.no_speech_prob,
        compression_ratio=msg.compression_ratio,
    )


_WORK_TO_PROTO = {
    WorkClass.BATCH: transcriber_pb2.WORK_CLASS_BATCH,
    WorkClass.INTERACTIVE: transcriber_pb2.WORK_CLASS_INTERACTIVE,
    WorkClass.LIVE: transcriber_pb2.WORK_CLASS_LIVE,
}
_WORK_FROM_PROTO = {v: k for k, v in _WORK_TO_PROTO.items()}


def work_class_to_proto(wc: WorkClass) -> transcriber_pb2.WorkClass.ValueType:
    return _WORK_TO_PROTO[wc]


def work_class_from_proto(value: int) -> WorkClass:
    return _WORK_FROM_PROTO.get(value, WorkClass.BATCH)  # type: ignore[call-overload]


def options_to_proto(opts: DecodeOptions) -> transcriber_pb2.DecodeOptions:
    return transcriber_pb2.DecodeOptions(
        language_code=opts.language or "",
        beam_size=opts.beam_size,
        initial_prompt=opts.initial_prompt or "",
        word_timestamps=opts.word_timestamps,
        temperature=opts.temperature,
        temperature_fallback=opts.temperature_fallback,
        prefix=opts.prefix or "",
        dynamic_context=opts.dynamic_context,
    )


def options_from_proto(msg: transcriber_pb2.DecodeOptions) -> DecodeOptions:
    return DecodeOptions(
        language=msg.language_code or None,
        beam_size=msg.beam_size,
        initial_prompt=msg.initial_prompt or None,
        word_timestamps=msg.word_timestamps,
        temperature=msg.temperature,
        temperature_fallback=msg.temperature_fallback,
        prefix=msg.prefix or None,
        dynamic_context=msg.dynamic_context,
    )


def window_result_to_proto(res: WindowResult, model: str) -> transcriber_pb2.TranscribeResponse:
    return transcriber_pb2.TranscribeResponse(
        segments=[segment_to_proto(s) for s in res.segments],
        language_code=res.language,
        language_probability=res.language_probability,
        window_seconds=res.duration,
        served_by=res.served_by,
        model=model,
        batch_size=res.batch_size,
        model_seconds=res.model_seconds,
        model_workers=res.model_workers,
    )


def window_result_from_proto(msg: transcriber_pb2.TranscribeResponse) -> WindowResult:
    return WindowResult(
        segments=[segment_from_proto(s) for s in msg.segments],
        language=msg.language_code,
        language_probability=msg.language_probability,
        duration=msg.window_seconds,
        served_by=msg.served_by,
        batch_size=msg.batch_size,
        model=msg.model,
        model_seconds=msg.model_seconds,
        model_workers=max(msg.model_workers, 1),
    )
