"""Transcriber gRPC servicer: validates, converts, hands the window to the batcher."""

from __future__ import annotations

from services.shared import convert
from services.shared.domain import MAX_WINDOW_SECONDS, SAMPLE_RATE
from services.shared.errors import InvalidInput, Unavailable
from services.shared.internal.v1 import transcriber_pb2, transcriber_pb2_grpc
from services.shared.pcm import from_pcm16
from services.transcriber.batcher import Batcher
from services.transcriber.engine import Engine, WindowRequest

MAX_PCM_BYTES = int(MAX_WINDOW_SECONDS * SAMPLE_RATE) * 2


class TranscriberServicer(transcriber_pb2_grpc.TranscriberServicer):
    def __init__(self, engine: Engine, batcher: Batcher) -> None:
        self.engine = engine
        self.batcher = batcher

    async def Transcribe(
        self, request: transcriber_pb2.TranscribeRequest, context: object
    ) -> transcriber_pb2.TranscribeResponse:
        if not self.engine.ready:
            raise Unavailable("model is still loading", reason="MODEL_LOADING", retry_after_seconds=1.0)
        pcm = request.pcm
        if not pcm:
            raise InvalidInput("pcm is empty", reason="EMPTY_AUDIO", field="pcm")
        if len(pcm) % 2:
            raise InvalidInput(
                "pcm must be 16-bit samples (an even number of bytes)", reason="PARTIAL_FRAME", field="pcm"
            )
        if len(pcm) > MAX_PCM_BYTES:
            raise InvalidInput(
                f"window is {len(pcm) / 2 / SAMPLE_RATE:.1f}s of 16 kHz audio; the maximum is "
                f"{MAX_WINDOW_SECONDS:.0f}s",
                reason="AUDIO_TOO_LONG",
                field="pcm",
            )
        options = convert.options_from_proto(request.options)
        self.engine.validate(options)
        audio = from_pcm16(pcm)
        result = await self.batcher.submit(
            WindowRequest(audio, options), convert.work_class_from_proto(request.work_class)
        )
        return convert.window_result_to_proto(result, self.engine.model_name)

    async def GetInfo(
        self, request: transcriber_pb2.GetInfoRequest, context: object
    ) -> transcriber_pb2.TranscriberInfo:
        if not self.engine.ready:
            raise Unavailable("model is still loading", reason="MODEL_LOADING", retry_after_seconds=1.0)
        return transcriber_pb2.TranscriberInfo(
            model=self.engine.model_name,
            multilingual=self.engine.multilingual,
            language_codes=self.engine.languages(),
            served_by=self.engine.served_by,
            device=self.engine.settings.device,
            max_batch_size=self.engine.settings.batching()[0],
        )
