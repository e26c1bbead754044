"""stt.v1.Speech over gRPC: a thin mapping onto services.gateway.speech.SpeechAPI."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from services.gateway.speech import SpeechAPI
from stt.v1 import speech_pb2, speech_pb2_grpc


class SpeechServicer(speech_pb2_grpc.SpeechServicer):
    def __init__(self, api: SpeechAPI, server_info: Callable[[], Awaitable[speech_pb2.ServerInfo]]) -> None:
        self.api = api
        self.info = server_info

    async def Recognize(
        self, request: speech_pb2.RecognizeRequest, context: grpc.aio.ServicerContext
    ) -> speech_pb2.RecognizeResponse:
        return await self.api.recognize(request)

    async def StreamingRecognize(
        self,
        request_iterator: AsyncIterator[speech_pb2.StreamingRecognizeRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[speech_pb2.StreamingRecognizeResponse]:
        async for response in self.api.stream(request_iterator, resumable=True):
            yield response

    async def GetServerInfo(
        self, request: speech_pb2.GetServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> speech_pb2.ServerInfo:
        return await self.info()
