"""Domain errors (services.shared.errors) as HTTP statuses and OpenAI's error JSON.

The body is OpenAI's shape, so OpenAI clients raise the matching exception:
`{"error": {"message", "type", "param", "code"}}` with `code` the ErrorReason in lower case (the
gRPC ErrorInfo.reason, e.g. "audio_too_large") and `param` the offending field. Retryable errors
carry `Retry-After`. The table below is also in README's "HTTP errors" section.
"""

from __future__ import annotations

import math
from typing import Any

from services.shared import errors

# (class, HTTP status, OpenAI error type); the first match wins (subclasses before their bases).
_TABLE: list[tuple[type[errors.ServiceError], int, str]] = [
    (errors.InvalidInput, 400, "invalid_request_error"),
    (errors.QuotaExceeded, 429, "rate_limit_error"),
    (errors.LimitExceeded, 400, "invalid_request_error"),  # refined by reason below
    (errors.Unauthenticated, 401, "authentication_error"),
    (errors.PermissionDenied, 403, "permission_error"),
    (errors.NotFound, 404, "not_found_error"),
    (errors.WrongState, 409, "invalid_request_error"),
    (errors.AlreadyExists, 409, "invalid_request_error"),
    (errors.Aborted, 409, "invalid_request_error"),
    (errors.DeadlineExceeded, 408, "timeout_error"),
    (errors.Unavailable, 503, "server_error"),
    (errors.Internal, 500, "server_error"),
]
# RESOURCE_EXHAUSTED reasons with a more precise HTTP status.
_BY_REASON = {
    "AUDIO_TOO_LARGE": (413, "invalid_request_error"),
    "QUOTA_EXCEEDED": (429, "rate_limit_error"),
    "RATE_LIMITED": (429, "rate_limit_error"),
    "CAPACITY_EXHAUSTED": (429, "rate_limit_error"),
    "STREAM_BACKLOG": (429, "rate_limit_error"),
    "PRIORITY_NOT_ALLOWED": (403, "permission_error"),
}


def status_of(err: errors.ServiceError) -> tuple[int, str]:
    """HTTP status and OpenAI error type for a domain error."""
    if isinstance(err, errors.LimitExceeded) and err.reason in _BY_REASON:
        return _BY_REASON[err.reason]
    for cls, status, kind in _TABLE:
        if isinstance(err, cls):
            return status, kind
    return 500, "server_error"


def retry_after(err: errors.ServiceError) -> float | None:
    if isinstance(err, errors.Unavailable | errors.QuotaExceeded):
        return err.retry_after_seconds
    return None


def body_of(err: errors.ServiceError) -> dict[str, Any]:
    _, kind = status_of(err)
    return {
        "error": {
            "message": err.message,
            "type": kind,
            "param": err.field,
            "code": err.reason.lower() if err.reason else None,
        }
    }


def headers_of(err: errors.ServiceError, request_id: str = "") -> dict[str, str]:
    headers = {}
    delay = retry_after(err)
    if delay is not None:
        headers["Retry-After"] = str(max(1, math.ceil(delay)))
    if request_id:
        headers["x-request-id"] = request_id
    if isinstance(err, errors.Unauthenticated):
        headers["WWW-Authenticate"] = "Bearer"
    return headers


def ws_close_code(err: errors.ServiceError) -> int:
    """WebSocket close code after an error event: 1008 policy (bad input, auth, limits), 1013 try
    again later (retryable, quotas), 1012 service restart (draining), 1011 server fault."""
    status, _ = status_of(err)
    if err.reason == "DRAINING":
        return 1012
    if status in (429, 503):
        return 1013
    if status >= 500:
        return 1011
    return 1008
