"""Per-request context carried through logs (request id, job id) via contextvars."""

from __future__ import annotations

import contextvars
import uuid
from collections.abc import Callable
from dataclasses import dataclass

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
job_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("job_id", default="")

REQUEST_ID_HEADER = "x-request-id"


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


@dataclass
class CallAudit:
    """What the access log records about one call besides method and status: who called (tenant
    and key id, never the key) and how many bytes of audio it carried. The doors fill it in."""

    tenant: str = ""
    key_id: str = ""
    audio_bytes: int = 0


audit_var: contextvars.ContextVar[CallAudit | None] = contextvars.ContextVar("audit", default=None)


def audit() -> CallAudit:
    """The current call's audit record (a throwaway one outside a call)."""
    return audit_var.get() or CallAudit()


# Run when the current call ends, however it ends (even when it fails before its handler runs):
# interceptors that take something for a call (e.g. memory for its body) register its release here.
call_cleanups_var: contextvars.ContextVar[list[Callable[[], None]] | None] = contextvars.ContextVar(
    "call_cleanups", default=None
)
