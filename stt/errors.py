"""SDK errors: a failed call as a Python exception with its status, reason and rich details."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


class SttError(Exception):
    """A call failed. `code` is the gRPC status code; the rest comes from the error details:
    `reason` (an stt.v1.ErrorReason name such as "TRUNCATED_AUDIO"), `fields` (BadRequest field
    path -> description), `retry_after` (seconds, from RetryInfo), `quota` (QuotaFailure
    descriptions, which name the quota) with `quota_subjects` (e.g. "tenant:acme") and `request_id`
    (to match the server's logs)."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str = "",
        fields: dict[str, str] | None = None,
        retry_after: float | None = None,
        request_id: str = "",
        quota: list[str] | None = None,
        metadata: dict[str, str] | None = None,
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.reason = reason
        self.fields = fields or {}
        self.retry_after = retry_after
        self.request_id = request_id
        self.quota = quota or []
        self.quota_subjects: list[str] = []
        self.metadata = metadata or {}

    @classmethod
    def from_rpc_error(cls, exc: grpc.RpcError) -> SttError:
        code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
        message = (exc.details() if hasattr(exc, "details") else str(exc)) or ""
        out = cls(code, message)
        try:
            status = rpc_status.from_call(exc)
        except (ValueError, AttributeError):
            status = None
        for detail in status.details if status else ():
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                out.reason, out.metadata = info.reason, dict(info.metadata)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                out.fields = {v.field: v.description for v in bad.field_violations}
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
                out.retry_after = retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9
            elif detail.Is(error_details_pb2.RequestInfo.DESCRIPTOR):
                req = error_details_pb2.RequestInfo()
                detail.Unpack(req)
                out.request_id = req.request_id
            elif detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
                quota = error_details_pb2.QuotaFailure()
                detail.Unpack(quota)
                out.quota = [v.description for v in quota.violations]
                out.quota_subjects = [v.subject for v in quota.violations]
        if not out.request_id and hasattr(exc, "trailing_metadata"):
            for key, value in exc.trailing_metadata() or ():
                if key == "x-request-id" and isinstance(value, str):
                    out.request_id = value
        return out
