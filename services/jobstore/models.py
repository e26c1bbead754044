"""SQLAlchemy 2 models: jobs and their chunks. Schema changes go through Alembic migrations."""

from __future__ import annotations

import datetime as dt
import enum

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


class Status(enum.StrEnum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in (Status.COMPLETED, Status.FAILED, Status.CANCELLED)


class ChunkState(enum.StrEnum):
    PENDING = "PENDING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"


class Priority(enum.IntEnum):
    LOW = 1
    NORMAL = 2
    HIGH = 3


class Base(DeclarativeBase):
    pass


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128))
    request_id: Mapped[str | None] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(16), default=Status.QUEUED)
    priority: Mapped[int] = mapped_column(Integer, default=Priority.NORMAL)
    language: Mapped[str | None] = mapped_column(String(16))
    config_json: Mapped[str] = mapped_column(Text, default="{}")
    filename: Mapped[str] = mapped_column(String(512), default="")
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    audio_duration: Mapped[float] = mapped_column(Float, default=0.0)
    blob_key: Mapped[str] = mapped_column(String(128))
    # Keep the audio after the job COMPLETES; and whether it is still stored.
    keep_audio: Mapped[bool] = mapped_column(Boolean, default=False)
    audio_retained: Mapped[bool] = mapped_column(Boolean, default=True)
    worker_id: Mapped[str | None] = mapped_column(String(256))
    lease_epoch: Mapped[int] = mapped_column(BigInteger, default=0)
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    # Attempts charged to the job (errors it caused); it FAILS when this reaches max_attempts.
    retry_count: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    # Interruptions not charged: restarts, drains, lost workers.
    interruption_count: Mapped[int] = mapped_column(Integer, default=0)
    # Interruptions in a row with no progress (a chunk or the plan recorded) in between: past the
    # allowance, a job that keeps losing its worker is suspected of killing it and is charged.
    stall_count: Mapped[int] = mapped_column(Integer, default=0)
    # Not claimable before this time (backoff after interruptions without progress).
    not_before: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    # Why it FAILED: an stt.v1.ErrorReason name.
    failure_reason: Mapped[str | None] = mapped_column(String(64))
    chunks_total: Mapped[int] = mapped_column(Integer, default=0)
    chunks_completed: Mapped[int] = mapped_column(Integer, default=0)
    transcript: Mapped[str | None] = mapped_column(Text)
    detected_language: Mapped[str | None] = mapped_column(String(16))
    error_message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    started_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    completed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    # The trace context (W3C traceparent) of the call that created the job: whoever runs the job
    # continues that trace (services.shared.tracing). Empty when tracing is off.
    trace_parent: Mapped[str | None] = mapped_column(String(64))

    chunks: Mapped[list[Chunk]] = relationship(
        back_populates="job", cascade="all, delete-orphan", passive_deletes=True, order_by="Chunk.idx"
    )

    __table_args__ = (
        UniqueConstraint("tenant", "request_id", name="uq_jobs_tenant_request_id"),
        # Claims: queued jobs by priority then age.
        Index("ix_jobs_claim", "status", "priority", "created_at"),
        Index("ix_jobs_lease", "status", "lease_expires_at"),
        Index("ix_jobs_expiry", "expires_at"),
        Index("ix_jobs_tenant_created", "tenant", "created_at", "id"),
        Index("ix_jobs_tenant_status", "tenant", "status"),
    )


class Chunk(Base):
    __tablename__ = "chunks"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    idx: Mapped[int] = mapped_column(Integer, primary_key=True)
    start_time: Mapped[float] = mapped_column(Float)
    end_time: Mapped[float] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String(16), default=ChunkState.PENDING)
    text: Mapped[str | None] = mapped_column(Text)
    segments_json: Mapped[str | None] = mapped_column(Text)
    language: Mapped[str | None] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    processed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    # Epoch of the lease under which the result was written (for audits of fencing).
    lease_epoch: Mapped[int | None] = mapped_column(BigInteger)

    job: Mapped[Job] = relationship(back_populates="chunks")
