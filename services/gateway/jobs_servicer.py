"""stt.v1.Jobs: not implemented in this build yet; every RPC answers UNIMPLEMENTED clearly."""

from __future__ import annotations

from typing import Any, NoReturn

import grpc

from stt.v1 import jobs_pb2_grpc


async def _unimplemented(context: grpc.aio.ServicerContext, name: str) -> NoReturn:
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"Jobs.{name} is not implemented in this build yet")
    raise AssertionError("unreachable")


class JobsServicer(jobs_pb2_grpc.JobsServicer):
    async def CreateJob(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        await _unimplemented(context, "CreateJob")

    async def GetJob(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await _unimplemented(context, "GetJob")

    async def ListJobs(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await _unimplemented(context, "ListJobs")

    async def WatchJob(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await _unimplemented(context, "WatchJob")

    async def CancelJob(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await _unimplemented(context, "CancelJob")

    async def DeleteJob(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await _unimplemented(context, "DeleteJob")

    async def GetTranscript(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await _unimplemented(context, "GetTranscript")

    async def GetQueueStats(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await _unimplemented(context, "GetQueueStats")
