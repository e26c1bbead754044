"""The jobstore's metrics: jobs by state and priority, the queue, lease expiries, turnaround.
The jobstore is the one place that sees every job, whichever gateway runs it."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram
from sqlalchemy import func, select

from services.jobstore.models import Job, Priority, Status
from services.jobstore.store import Store

QUEUED = Gauge("stt_jobs_queued", "Queued jobs per priority", ["priority"])
RUNNING = Gauge("stt_jobs_running", "Running jobs per priority", ["priority"])
OLDEST_WAIT = Gauge(
    "stt_jobs_oldest_wait_seconds", "Wait of the oldest queued job per priority", ["priority"]
)
JOBS = Gauge("stt_jobs", "Jobs kept in the store, by state and priority", ["state", "priority"])
LEASES_EXPIRED = Counter(
    "stt_jobs_leases_expired_total",
    "Leases that expired because their holder stopped renewing them: the job went back to the queue "
    "for another gateway to take over (or failed on its last attempt)",
)
TURNAROUND = Histogram(
    "stt_job_turnaround_seconds",
    "Time from a job's creation to its completion (COMPLETED jobs), per priority",
    ["priority"],
    buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 43200, 86400),
)


async def export(store: Store) -> None:
    """Refresh the gauges from the database (every few seconds)."""
    stats = await store.queue_stats()
    for p in stats.priorities:
        name = Priority(p.priority).name
        QUEUED.labels(name).set(p.pending)
        RUNNING.labels(name).set(p.running)
        OLDEST_WAIT.labels(name).set(p.oldest_wait)
    counts = {(state, priority): 0 for state in Status for priority in Priority}
    async with store.sessions() as s:
        rows = await s.execute(
            select(Job.status, Job.priority, func.count()).group_by(Job.status, Job.priority)
        )
        for status, priority, n in rows:
            counts[(Status(status), Priority(priority))] = n
    for (state, priority), n in counts.items():
        JOBS.labels(state.name, priority.name).set(n)


async def reap(store: Store) -> list[str]:
    """store.reap_expired, counted."""
    expired = await store.reap_expired()
    LEASES_EXPIRED.inc(len(expired))
    return expired


def completed(job: Job) -> None:
    if job.completed_at is not None and job.status == Status.COMPLETED:
        seconds = (job.completed_at - job.created_at).total_seconds()
        TURNAROUND.labels(Priority(job.priority).name).observe(max(0.0, seconds))
