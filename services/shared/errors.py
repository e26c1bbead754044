"""Domain errors (no grpc here) that servicers turn into canonical status codes with rich details.

Domain code raises these; `services.shared.status` maps them onto gRPC.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class ServiceError(Exception):
    """Base: a message for humans, a machine-readable reason, optional offending field."""

    message: str
    reason: str = "ERROR"
    field: str | None = None
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)

    def __str__(self) -> str:
        return self.message


class InvalidInput(ServiceError):
    """Bad request: INVALID_ARGUMENT."""


class LimitExceeded(ServiceError):
    """Over a configured limit: RESOURCE_EXHAUSTED."""


class NotFound(ServiceError):
    """NOT_FOUND (also for another tenant's resources)."""


class WrongState(ServiceError):
    """FAILED_PRECONDITION."""


class AlreadyExists(ServiceError):
    """ALREADY_EXISTS."""


@dataclass
class Unavailable(ServiceError):
    """Retryable: UNAVAILABLE with a retry delay."""

    retry_after_seconds: float = 1.0


class Aborted(ServiceError):
    """ABORTED: a concurrency conflict such as a stale lease epoch."""
