"""Map domain errors onto canonical gRPC status codes with google.rpc rich details, and back."""

from __future__ import annotations

from typing import NoReturn

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from services.shared import errors
from services.shared.context import request_id_var

DOMAIN = "stt.v1"
# Client-supplied values can be long: keep trailers well under gRPC's 8 KiB metadata default.
MAX_MESSAGE_CHARS = 1024

_CODES: list[tuple[type[errors.ServiceError], grpc.StatusCode]] = [
    (errors.InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.LimitExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.WrongState, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.Aborted, grpc.StatusCode.ABORTED),
    (errors.Internal, grpc.StatusCode.INTERNAL),
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


def _duration(seconds: float) -> duration_pb2.Duration:
    seconds = max(seconds, 0.0)
    return duration_pb2.Duration(seconds=int(seconds), nanos=int((seconds % 1) * 1e9))


def _clip(text: str) -> str:
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 3] + "..."


class _Status(grpc.Status):
    def __init__(self, code: grpc.StatusCode, details: str, trailing_metadata: tuple) -> None:
        self.code = code
        self.details = details
        self.trailing_metadata = trailing_metadata


def retry_after(err: errors.ServiceError) -> float | None:
    if isinstance(err, errors.Unavailable):
        return err.retry_after_seconds
    if isinstance(err, errors.QuotaExceeded):
        return err.retry_after_seconds
    return None


def to_status(err: errors.ServiceError, request_id: str | None = None) -> grpc.Status:
    """A grpc.Status carrying ErrorInfo, RequestInfo, and where they apply BadRequest, RetryInfo
    and QuotaFailure."""
    code = code_for(err)
    message = _clip(err.message)
    proto = status_pb2.Status(code=getattr(code_pb2, code.name), message=message)
    metadata = {k: _clip(v) for k, v in err.metadata.items()}
    proto.details.append(
        _pack(error_details_pb2.ErrorInfo(reason=err.reason, domain=DOMAIN, metadata=metadata))
    )
    rid = request_id if request_id is not None else request_id_var.get()
    if rid:
        proto.details.append(_pack(error_details_pb2.RequestInfo(request_id=rid)))
    if err.field:
        bad = error_details_pb2.BadRequest()
        bad.field_violations.add(field=err.field, description=message)
        proto.details.append(_pack(bad))
    if isinstance(err, errors.QuotaExceeded) and err.quota:
        quota = error_details_pb2.QuotaFailure()
        quota.violations.add(subject=err.subject, description=f"{err.quota}: {message}")
        proto.details.append(_pack(quota))
    extra: tuple = ()
    delay = retry_after(err)
    if delay is not None:
        proto.details.append(_pack(error_details_pb2.RetryInfo(retry_delay=_duration(delay))))
        if isinstance(err, errors.Unavailable):
            # Honoured by the gRPC retry policy of clients that enable it.
            extra = (("grpc-retry-pushback-ms", str(int(max(delay, 0.0) * 1000))),)
    if rid:
        extra += (("x-request-id", rid),)
    status = rpc_status.to_status(proto)
    return _Status(status.code, status.details, tuple(status.trailing_metadata) + extra)


async def abort(context: grpc.aio.ServicerContext, err: errors.ServiceError) -> NoReturn:
    await context.abort_with_status(to_status(err))
    raise AssertionError("unreachable")  # abort_with_status always raises


_FROM_CODE: dict[grpc.StatusCode, type[errors.ServiceError]] = {code: cls for cls, code in _CODES}


def error_from_rpc(
    exc: grpc.aio.AioRpcError, *, prefix: str = "", unavailable_reason: str = "TRANSCRIBER_UNAVAILABLE"
) -> errors.ServiceError:
    """A downstream call's failure as a domain error (same code, message, reason and field), so it
    reaches our own caller unchanged. Codes without a domain class become Unavailable."""
    code = exc.code()
    reason, field_name, delay = "", None, None
    try:
        status = rpc_status.from_call(exc)
    except ValueError:
        status = None
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            if bad.field_violations:
                field_name = bad.field_violations[0].field
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            delay = retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9
    message = f"{prefix}{exc.details() or code.name}"
    cls = _FROM_CODE.get(code)
    if code == grpc.StatusCode.INTERNAL:
        return errors.Internal(message, reason=reason or "INTERNAL", field=field_name)
    if cls is None or cls is errors.Unavailable:
        return errors.Unavailable(
            message,
            reason=reason or unavailable_reason,
            field=field_name,
            retry_after_seconds=delay if delay is not None else 1.0,
        )
    if cls is errors.LimitExceeded and delay is not None:
        return errors.QuotaExceeded(message, reason=reason, field=field_name, retry_after_seconds=delay)
    return cls(message, reason=reason or code.name, field=field_name)
