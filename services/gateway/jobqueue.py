"""What the dispatcher needs from the jobstore, as domain types (no grpc)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from services.shared.domain import DecodeOptions, Segment


@dataclass(slots=True)
class Lease:
    job_id: str
    worker_id: str
    epoch: int
    seconds: float


@dataclass(slots=True)
class ClaimedJob:
    job_id: str
    epoch: int
    options: DecodeOptions
    encoding: str
    sample_rate: int
    channels: int
    chunks_total: int
    retry_count: int
    # For the job's trace: the stored context to continue, when it was created (Unix seconds), priority.
    trace_parent: str = ""
    created_at: float = 0.0
    priority: str = ""
    interruption_count: int = 0


@dataclass(slots=True)
class ChunkInfo:
    index: int
    start: float
    end: float
    completed: bool
    segments: list[Segment] = field(default_factory=list)
    language: str = ""


class JobQueue(Protocol):
    async def claim(self, worker_id: str, lease_seconds: float, wait_seconds: float) -> ClaimedJob | None: ...
    async def heartbeat(self, lease: Lease) -> bool:
        """True if the job was cancelled. Raises Aborted if the lease is lost."""
        ...

    def read_audio(self, job_id: str) -> AsyncIterator[bytes]: ...
    async def set_plan(self, lease: Lease, spans: Sequence[tuple[float, float]]) -> list[ChunkInfo]: ...
    async def chunks(self, job_id: str) -> list[ChunkInfo]: ...
    async def complete_chunk(
        self, lease: Lease, index: int, segments: list[Segment], language: str
    ) -> None: ...
    async def fail_chunk(self, lease: Lease, index: int, error: str, reason: str) -> bool:
        """Charge an attempt for a chunk's own error; True if the job failed because of it."""
        ...

    async def complete_job(self, lease: Lease, transcript: str, language: str) -> None: ...
    async def fail_job(self, lease: Lease, error: str, reason: str) -> None: ...
    async def release(self, lease: Lease) -> None: ...
