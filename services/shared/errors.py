"""Domain errors (no grpc here) that servicers turn into canonical status codes with rich details.

Domain code raises these; `services.shared.status` maps them onto gRPC. Every error names a
`reason` from the public `stt.v1.ErrorReason` enum (without its ERROR_REASON_ prefix); the
contract test checks that each reason used in the code is documented there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass
class ServiceError(Exception):
    """Base: a message for humans, a machine-readable reason, optional offending field."""

    message: str
    reason: str
    field: str | None = None
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)

    def __str__(self) -> str:
        return self.message

    def relocated(self, paths: Mapping[str, str]) -> ServiceError:
        """The same error with its field path rewritten for the RPC that reports it: each key of
        `paths` is a prefix (e.g. "config." or "content") replaced by its value (e.g.
        "metadata.config." or "audio_chunk"). Domain code names fields as Recognize does."""
        if self.field:
            for old, new in paths.items():
                if self.field == old or (old.endswith(".") and self.field.startswith(old)):
                    self.field = new + self.field[len(old) :] if old.endswith(".") else new
                    break
        return self


class InvalidInput(ServiceError):
    """Bad request: INVALID_ARGUMENT."""


class LimitExceeded(ServiceError):
    """Over a configured limit: RESOURCE_EXHAUSTED."""


@dataclass
class QuotaExceeded(LimitExceeded):
    """A per-tenant quota or admission control: RESOURCE_EXHAUSTED with QuotaFailure and RetryInfo."""

    subject: str = ""  # e.g. "tenant:acme"
    quota: str = ""  # e.g. "concurrent_streams"
    retry_after_seconds: float | None = None


class NotFound(ServiceError):
    """NOT_FOUND (also for another tenant's resources)."""


class WrongState(ServiceError):
    """FAILED_PRECONDITION."""


class AlreadyExists(ServiceError):
    """ALREADY_EXISTS."""


class Unauthenticated(ServiceError):
    """UNAUTHENTICATED: no credentials, or unknown ones."""


class PermissionDenied(ServiceError):
    """PERMISSION_DENIED: known credentials that may not do this."""


class DeadlineExceeded(ServiceError):
    """DEADLINE_EXCEEDED: the server stopped waiting (e.g. an idle stream)."""


@dataclass
class Unavailable(ServiceError):
    """Retryable: UNAVAILABLE with a retry delay."""

    retry_after_seconds: float = 1.0


class Aborted(ServiceError):
    """ABORTED: a concurrency conflict such as a stale lease epoch."""


class Internal(ServiceError):
    """INTERNAL: a bug on our side."""
