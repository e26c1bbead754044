"""Jobstore settings (env STT_*)."""

from __future__ import annotations

import os

from pydantic import SecretStr

from services.shared.config import CommonSettings


class JobstoreSettings(CommonSettings):
    jobstore_port: int = 50053
    # Where SQLite (the default database) and audio blobs live.
    data_dir: str = "./data"
    # SQLAlchemy async URL; default: SQLite in data_dir. PostgreSQL: postgresql+asyncpg://user:pw@host/db
    database_url: str | None = None
    # Run Alembic migrations at start (turn off when a migration Job does it).
    db_migrate: bool = True
    db_pool_size: int = 10
    # Optional Redis for cross-replica wake-ups and job events; SQL stays the truth.
    redis_url: str | None = None
    # Key/channel prefix, so several deployments (or test runs) can share one Redis.
    redis_prefix: str = "stt"
    # How often waiting claims and watchers re-check SQL in case a Redis message was lost.
    reconcile_seconds: float = 2.0
    # Leases: default length, and how often expired ones are returned to the queue.
    lease_seconds: float = 30.0
    reap_interval_seconds: float = 1.0
    max_attempts: int = 3
    # Interruptions (restarts, drains, lost workers) are not charged as attempts, except when a job
    # keeps losing its worker with no progress in between: each one after this many in a row is
    # charged, so a job that keeps killing its worker FAILS (WORKER_LOST) instead of looping. After
    # the second in a row the job also waits before its next claim (1 s, doubling, up to the max).
    stalls_before_charge: int = 5
    max_interruption_backoff_seconds: float = 60.0
    # At start, put RUNNING jobs straight back in the queue (an interruption) instead of waiting for
    # their leases to expire. Only safe when this process's own dispatcher is the only worker, as in
    # the embedded `stt up`.
    requeue_running_on_start: bool = False
    # Retention of finished jobs (results and audio).
    result_ttl_seconds: float = 86_400.0
    failed_ttl_seconds: float = 7 * 86_400.0
    sweep_interval_seconds: float = 60.0
    # The store's own limit on one job's audio, whatever its callers check (default 1 GiB, the
    # gateway's default upload limit).
    max_blob_bytes: int = 1024 * 1024 * 1024
    # Encrypt stored audio and transcripts with this key (base64 of 32 bytes); older keys still
    # decrypt what they sealed (comma-separated). Unset: stored as written.
    encryption_key: SecretStr | None = None
    encryption_old_keys: SecretStr | None = None

    def db_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{os.path.abspath(os.path.join(self.data_dir, 'jobs.db'))}"

    def blob_dir(self) -> str:
        return os.path.abspath(os.path.join(self.data_dir, "blobs"))
