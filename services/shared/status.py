"""Map domain errors onto canonical gRPC status codes with google.rpc rich details."""

from __future__ import annotations

from typing import NoReturn

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from services.shared import errors
from stt.errors import SttError

DOMAIN = "stt.v1"

_CODES: list[tuple[type[errors.ServiceError], grpc.StatusCode]] = [
    (errors.InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.LimitExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.WrongState, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.Aborted, grpc.StatusCode.ABORTED),
]


def code_for(err: errors.ServiceError) -> grpc.StatusCode:
    for cls, code in _CODES:
        if isinstance(err, cls):
            return code
    return grpc.StatusCode.INTERNAL


def _pack(msg: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(msg)  # type: ignore[arg-type]
    return packed


class _Status(grpc.Status):
    def __init__(self, code: grpc.StatusCode, details: str, trailing_metadata: tuple) -> None:
        self.code = code
        self.details = details
        self.trailing_metadata = trailing_metadata


def to_status(err: errors.ServiceError) -> grpc.Status:
    """A grpc.Status carrying ErrorInfo, BadRequest (when a field is named) and RetryInfo."""
    code = code_for(err)
    proto = status_pb2.Status(code=getattr(code_pb2, code.name), message=err.message)
    proto.details.append(
        _pack(error_details_pb2.ErrorInfo(reason=err.reason, domain=DOMAIN, metadata=err.metadata))
    )
    if err.field:
        bad = error_details_pb2.BadRequest()
        bad.field_violations.add(field=err.field, description=err.message)
        proto.details.append(_pack(bad))
    extra: tuple = ()
    if isinstance(err, errors.Unavailable):
        delay = max(err.retry_after_seconds, 0.0)
        retry = error_details_pb2.RetryInfo(
            retry_delay=duration_pb2.Duration(seconds=int(delay), nanos=int((delay % 1) * 1e9))
        )
        proto.details.append(_pack(retry))
        # Honoured by the gRPC retry policy of clients that enable it.
        extra = (("grpc-retry-pushback-ms", str(int(delay * 1000))),)
    status = rpc_status.to_status(proto)
    return _Status(status.code, status.details, tuple(status.trailing_metadata) + extra)


async def abort(context: grpc.aio.ServicerContext, err: errors.ServiceError) -> NoReturn:
    await context.abort_with_status(to_status(err))
    raise AssertionError("unreachable")  # abort_with_status always raises


_FROM_CODE: dict[grpc.StatusCode, type[errors.ServiceError]] = {code: cls for cls, code in _CODES}


def error_from_rpc(exc: grpc.aio.AioRpcError, *, prefix: str = "") -> errors.ServiceError:
    """A downstream call's failure as a domain error (same code, message, reason and field), so it
    reaches our own caller unchanged. Codes without a domain class become Unavailable."""
    parsed = SttError.from_rpc_error(exc)
    code = parsed.code
    message = f"{prefix}{parsed.message or code.name}"
    reason = parsed.reason or code.name
    field_name = next(iter(parsed.fields), None)
    cls = _FROM_CODE.get(code)
    if cls is None or cls is errors.Unavailable:
        retry = parsed.retry_after if parsed.retry_after is not None else 1.0
        return errors.Unavailable(message, reason=reason, field=field_name, retry_after_seconds=retry)
    return cls(message, reason=reason, field=field_name)
