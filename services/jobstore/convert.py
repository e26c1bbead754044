"""Jobstore rows -> stt.v1 messages (protobuf, no grpc)."""

from __future__ import annotations

import datetime as dt
import json

from google.protobuf import json_format, timestamp_pb2

from services.jobstore.models import Chunk, ChunkState, Job
from services.jobstore.store import chunk_segments
from services.shared.convert import segment_to_proto
from services.shared.internal.v1 import jobstore_pb2
from stt.v1 import common_pb2, jobs_pb2

_STATUS = {
    "QUEUED": jobs_pb2.JOB_STATUS_QUEUED,
    "RUNNING": jobs_pb2.JOB_STATUS_RUNNING,
    "COMPLETED": jobs_pb2.JOB_STATUS_COMPLETED,
    "FAILED": jobs_pb2.JOB_STATUS_FAILED,
    "CANCELLED": jobs_pb2.JOB_STATUS_CANCELLED,
}
STATUS_NAMES = {v: k for k, v in _STATUS.items()}
_CHUNK = {
    ChunkState.PENDING: jobstore_pb2.CHUNK_STATUS_PENDING,
    ChunkState.COMPLETED: jobstore_pb2.CHUNK_STATUS_COMPLETED,
    ChunkState.FAILED: jobstore_pb2.CHUNK_STATUS_FAILED,
}


def ts(value: dt.datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(value.astimezone(dt.UTC))
    return out


def config_to_json(cfg: common_pb2.RecognitionConfig) -> dict[str, object]:
    return json_format.MessageToDict(cfg, preserving_proto_field_name=True, use_integers_for_enums=True)


def config_from_json(raw: str) -> common_pb2.RecognitionConfig:
    return json_format.ParseDict(
        json.loads(raw or "{}"), common_pb2.RecognitionConfig(), ignore_unknown_fields=True
    )


def job_to_proto(job: Job, *, audio_retained: bool = False) -> jobs_pb2.Job:
    return jobs_pb2.Job(
        job_id=job.id,
        status=_STATUS[job.status],
        priority=job.priority,  # type: ignore[arg-type]
        language_code=job.detected_language or job.language or "",
        filename=job.filename,
        size_bytes=job.size_bytes,
        audio_duration_seconds=job.audio_duration,
        request_id=job.request_id or "",
        retry_count=job.retry_count,
        interruption_count=job.interruption_count,
        max_attempts=job.max_attempts,
        chunks_total=job.chunks_total,
        chunks_completed=job.chunks_completed,
        error_message=job.error_message or "",
        failure_reason=(job.failure_reason or "") if job.status == "FAILED" else "",
        audio_retained=audio_retained,
        create_time=ts(job.created_at),
        start_time=ts(job.started_at),
        complete_time=ts(job.completed_at),
        update_time=ts(job.updated_at),
        expire_time=ts(job.expires_at),
        config=config_from_json(job.config_json),
    )


def stored_job(
    job: Job, *, with_transcript: bool = False, audio_retained: bool = False
) -> jobstore_pb2.StoredJob:
    return jobstore_pb2.StoredJob(
        job=job_to_proto(job, audio_retained=audio_retained),
        tenant=job.tenant,
        lease_epoch=job.lease_epoch,
        lease_expire_time=ts(job.lease_expires_at),
        transcript=(job.transcript or "") if with_transcript else "",
        trace_parent=job.trace_parent or "",
    )


def chunk_to_proto(chunk: Chunk) -> jobstore_pb2.Chunk:
    return jobstore_pb2.Chunk(
        index=chunk.idx,
        start_seconds=chunk.start_time,
        end_seconds=chunk.end_time,
        status=_CHUNK[ChunkState(chunk.status)],
        text=chunk.text or "",
        segments=[segment_to_proto(s) for s in chunk_segments(chunk)],
        attempts=chunk.attempts,
        error_message=chunk.error or "",
        process_time=ts(chunk.processed_at),
        language_code=chunk.language or "",
    )
