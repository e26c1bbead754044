"""The jobstore domain (Store) on real PostgreSQL and SQLite: same tests, both backends."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
from collections.abc import AsyncIterator

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import func, select, text

from services.jobstore import db, migrate
from services.jobstore.blobs import FileBlobStore
from services.jobstore.events import EventBus
from services.jobstore.models import Job, Priority, Status
from services.jobstore.store import Lease, NewJob, Span, Store
from services.shared.domain import Segment, Word
from services.shared.errors import Aborted, InvalidInput, LimitExceeded, NotFound, WrongState
from tests.support.datastores import postgres_database


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request, tmp_path) -> AsyncIterator[Store]:
    async def make(url: str) -> AsyncIterator[Store]:
        engine = db.create_engine(url)
        await migrate.upgrade(engine)
        bus = EventBus()
        st = Store(
            db.sessionmaker(engine), FileBlobStore(str(tmp_path / "blobs")), bus, reconcile_seconds=0.2
        )
        st.engine = engine  # type: ignore[attr-defined]
        try:
            yield st
        finally:
            await engine.dispose()

    if request.param == "sqlite":
        async for st in make(f"sqlite+aiosqlite:///{tmp_path}/jobs.db"):
            yield st
    else:
        async with postgres_database() as url:
            async for st in make(url):
                yield st


async def _pieces(*parts: bytes) -> AsyncIterator[bytes]:
    for p in parts:
        yield p


def _new(tenant: str = "t1", priority: int = Priority.NORMAL, request_id: str | None = None) -> NewJob:
    return NewJob(tenant, request_id, "a.wav", priority, "en", {"language_code": "en"}, 12.5, 3)


async def _create(store: Store, **kw) -> Job:
    job, created = await store.create_job(_new(**kw), _pieces(b"RIFF", b"x" * 1000))
    assert created
    return job


def _blob_count(store: Store) -> int:
    root = store.blobs.root  # type: ignore[attr-defined]
    return sum(len(files) for d, _, files in os.walk(root) if ".tmp" not in d)


def _head() -> str:

    head = ScriptDirectory.from_config(migrate.alembic_config("sqlite://")).get_current_head()
    assert head is not None
    return head


async def test_migrations_upgrade_an_empty_database_and_back(store: Store):
    engine = store.engine  # type: ignore[attr-defined]
    async with engine.connect() as conn:
        version = (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalar_one()
    assert version == _head()
    await migrate.downgrade(engine, "base")
    await migrate.upgrade(engine)
    await _create(store)


async def test_migrated_schema_matches_the_models(store: Store):
    """Every model change has its migration (autogenerate finds nothing to do)."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from services.jobstore.models import Base

    def diff(conn):  # type: ignore[no-untyped-def]
        return compare_metadata(MigrationContext.configure(conn), Base.metadata)

    async with store.engine.connect() as conn:  # type: ignore[attr-defined]
        assert await conn.run_sync(diff) == []


async def test_create_get_and_duplicate_request_id(store: Store):
    job, created = await store.create_job(_new(request_id="r-1"), _pieces(b"abc", b"def"))
    assert created and job.status == Status.QUEUED and job.size_bytes == 6
    again, created2 = await store.create_job(_new(request_id="r-1"), _pieces(b"other"))
    assert not created2 and again.id == job.id
    other_tenant, created3 = await store.create_job(_new(tenant="t2", request_id="r-1"), _pieces(b"x"))
    assert created3 and other_tenant.id != job.id
    assert _blob_count(store) == 2
    audio = b"".join([p async for p in store.read_audio(job.id, "t1")])
    assert audio == b"abcdef"


async def test_concurrent_duplicate_request_ids_make_one_job(store: Store):
    results = await asyncio.gather(
        *[store.create_job(_new(request_id="same"), _pieces(b"a" * 100)) for _ in range(8)]
    )
    assert len({j.id for j, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    assert _blob_count(store) == 1


async def test_cut_off_upload_leaves_no_job_and_no_blob(store: Store):
    async def broken() -> AsyncIterator[bytes]:
        yield b"part"
        raise ConnectionError("client went away")

    with pytest.raises(ConnectionError):
        await store.create_job(_new(request_id="cut"), broken())
    assert await store.find_by_request_id("t1", "cut") is None
    assert _blob_count(store) == 0
    assert store.blobs.spool.files() == []  # type: ignore[attr-defined]


async def test_oversized_upload_is_refused(store: Store):
    store.max_blob_bytes = 10
    with pytest.raises(LimitExceeded):
        await store.create_job(_new(), _pieces(b"x" * 8, b"y" * 8))
    assert _blob_count(store) == 0


async def test_tenants_cannot_see_each_others_jobs(store: Store):
    job = await _create(store, tenant="alice")
    with pytest.raises(NotFound):
        await store.get_job(job.id, "bob")
    with pytest.raises(NotFound):
        await store.cancel(job.id, "bob")
    with pytest.raises(NotFound):
        await store.delete(job.id, "bob")
    assert (await store.get_job(job.id, "alice")).id == job.id


async def test_claims_take_highest_priority_then_oldest(store: Store):
    low = await _create(store, priority=Priority.LOW)
    normal1 = await _create(store, priority=Priority.NORMAL)
    high = await _create(store, priority=Priority.HIGH)
    normal2 = await _create(store, priority=Priority.NORMAL)
    order = [(await store.claim("w1")).id for _ in range(4)]  # type: ignore[union-attr]
    assert order == [high.id, normal1.id, normal2.id, low.id]
    assert await store.claim("w1") is None


async def test_concurrent_claimers_never_share_a_job(store: Store):
    ids = {(await _create(store)).id for _ in range(10)}
    claimed = await asyncio.gather(*[store.claim(f"w{i}", wait_seconds=0.5) for i in range(16)])
    got = [j.id for j in claimed if j is not None]
    assert sorted(got) == sorted(ids)


async def test_claim_waits_for_new_work(store: Store):
    waiter = asyncio.create_task(store.claim("w1", wait_seconds=10))
    await asyncio.sleep(0.3)
    assert not waiter.done()
    job = await _create(store)
    claimed = await asyncio.wait_for(waiter, 5)
    assert claimed is not None and claimed.id == job.id and claimed.lease_epoch == 1


async def _lose_worker(store: Store, job_id: str) -> Job:
    """Claim the job under a short lease, let it expire, reap it."""
    claimed = await store.claim("w", lease_seconds=0.05, wait_seconds=5)
    assert claimed is not None and claimed.id == job_id
    await asyncio.sleep(0.1)
    assert job_id in await store.reap_expired()
    return await store.get_job(job_id)


async def test_lost_workers_are_interruptions_not_charged_attempts(store: Store):
    store.backoff_seconds = 0.01
    job = await _create(store)
    for n in range(1, store.stalls_before_charge + 1):
        after = await _lose_worker(store, job.id)
        assert (after.status, after.retry_count, after.interruption_count) == (Status.QUEUED, 0, n)
        assert "worker stopped responding" in (after.error_message or "")
    assert after.stall_count == store.stalls_before_charge and after.failure_reason is None


async def test_progress_ends_the_stall_streak(store: Store):
    store.backoff_seconds = 0.01
    job = await _create(store)
    for _ in range(store.stalls_before_charge):
        await _lose_worker(store, job.id)
    claimed = await store.claim("w", wait_seconds=5)
    lease = Lease(job.id, "w", claimed.lease_epoch)  # type: ignore[union-attr]
    await store.set_plan(lease, [Span(0, 0, 10), Span(1, 10, 20)])  # progress
    assert (await store.get_job(job.id)).stall_count == 0
    await store.release(lease)
    for _ in range(store.stalls_before_charge):
        after = await _lose_worker(store, job.id)
    assert after.retry_count == 0 and after.interruption_count == 2 * store.stalls_before_charge + 1
    claimed = await store.claim("w", wait_seconds=5)
    lease = Lease(job.id, "w", claimed.lease_epoch)  # type: ignore[union-attr]
    await store.complete_chunk(lease, 0, [Segment(0, 5, "hello")], "en")  # progress again
    assert (await store.get_job(job.id)).stall_count == 0


async def test_a_job_that_keeps_losing_its_worker_without_progress_fails(store: Store):
    """Poison protection: past the allowance, each interruption in a row without progress is
    charged, and the job FAILS with WORKER_LOST when its attempts are used up."""
    store.backoff_seconds = 0.01
    job = await _create(store)
    allowance = store.stalls_before_charge
    for n in range(1, allowance + job.max_attempts + 1):
        after = await _lose_worker(store, job.id)
        assert after.retry_count == max(0, n - allowance)
    assert after.status == Status.FAILED and after.failure_reason == "WORKER_LOST"
    assert "lost 8 times in a row" in (after.error_message or "")
    assert after.expires_at is not None


async def test_backoff_delays_the_next_claim_after_stalls(store: Store):
    store.backoff_seconds = 0.5
    job = await _create(store)
    assert store.backoff(1) == 0.0 and store.backoff(2) == 0.5 and store.backoff(3) == 1.0
    assert store.backoff(50) == store.max_backoff_seconds
    await _lose_worker(store, job.id)  # the first one: no wait
    after = await _lose_worker(store, job.id)
    assert after.not_before is not None and after.not_before > dt.datetime.now(dt.UTC)
    assert await store.claim("w") is None  # not yet
    claimed = await store.claim("w", wait_seconds=5)  # waits for the backoff to pass
    assert claimed is not None and claimed.id == job.id
    assert claimed.not_before is not None and dt.datetime.now(dt.UTC) >= claimed.not_before


async def test_restart_requeues_running_jobs_as_interruptions(store: Store):
    job = await _create(store)
    queued = await _create(store)
    claimed = await store.claim("w", lease_seconds=300)
    assert claimed is not None and claimed.id == job.id
    assert await store.reap_expired() == []  # the lease is still valid
    assert await store.reap_expired(all_running=True) == [job.id]
    after = await store.get_job(job.id)
    assert (after.status, after.retry_count, after.interruption_count) == (Status.QUEUED, 0, 1)
    assert "restarted" in (after.error_message or "")
    assert (await store.get_job(queued.id)).interruption_count == 0


async def test_stale_holder_cannot_write(store: Store):
    job = await _create(store)
    first = await store.claim("old", lease_seconds=0.05)
    assert first is not None
    old = Lease(job.id, "old", first.lease_epoch)
    await store.set_plan(old, [Span(0, 0, 10), Span(1, 10, 20)])
    await asyncio.sleep(0.1)
    await store.reap_expired()
    second = await store.claim("new", lease_seconds=30)
    assert second is not None and second.lease_epoch == first.lease_epoch + 1
    new = Lease(job.id, "new", second.lease_epoch)
    seg_new = [Segment(0, 5, "new words", [Word("new", 0, 1, 0.9)])]
    await store.complete_chunk(new, 0, seg_new, "en")
    for write in (
        store.complete_chunk(old, 0, [Segment(0, 5, "stale words")], "en"),
        store.complete_chunk(old, 1, [Segment(10, 15, "stale words")], "en"),
        store.heartbeat(old),
        store.complete_job(old, "stale", "en"),
        store.fail_job(old, "stale"),
        store.release(old),
    ):
        with pytest.raises(Aborted, match="stale lease"):
            await write
    chunks = await store.chunks(job.id)
    assert chunks[0].text == "new words" and chunks[1].status == "PENDING"
    assert (await store.get_job(job.id)).status == Status.RUNNING


async def test_chunk_plan_checkpoints_and_completion(store: Store):
    job = await _create(store)
    claimed = await store.claim("w")
    lease = Lease(job.id, "w", claimed.lease_epoch)  # type: ignore[union-attr]
    plan = await store.set_plan(lease, [Span(0, 0, 30), Span(1, 30, 55)])
    assert [c.idx for c in plan] == [0, 1]
    replan = await store.set_plan(lease, [Span(0, 0, 20)])  # a resumed holder gets the recorded plan
    assert [(c.start_time, c.end_time) for c in replan] == [(0, 30), (30, 55)]
    with pytest.raises(WrongState):
        await store.complete_job(lease, "early", "en")
    up = await store.complete_chunk(lease, 1, [Segment(31, 40, "second")], "en")
    assert (up.chunks_completed, up.chunks_total) == (1, 2)
    assert await store.partial_text(job.id) == "second"
    await store.complete_chunk(lease, 0, [Segment(1, 9, "first", [Word("first", 1, 2, 0.8)])], "en")
    # The first recorded result of a chunk stands.
    await store.complete_chunk(lease, 0, [Segment(1, 9, "different")], "en")
    assert await store.partial_text(job.id) == "first second"
    done = await store.complete_job(lease, "first second", "en")
    assert done.status == Status.COMPLETED and done.transcript == "first second"
    assert done.expires_at is not None and done.expires_at > dt.datetime.now(dt.UTC)
    with pytest.raises(WrongState):
        await store.cancel(job.id)


async def test_failing_chunk_fails_the_job_after_max_attempts(store: Store):
    job = await _create(store)
    other = await _create(store)
    claimed = await store.claim("w")
    assert claimed is not None and claimed.id == job.id
    lease = Lease(job.id, "w", claimed.lease_epoch)
    await store.set_plan(lease, [Span(0, 0, 30), Span(1, 30, 40)])
    for attempt in (1, 2):
        up = await store.fail_chunk(lease, 0, "transcriber exploded", "MODEL_ERROR")
        assert up.attempts == attempt and not up.job_failed
        assert (await store.get_job(job.id)).retry_count == attempt
    up = await store.fail_chunk(lease, 0, "transcriber exploded", "MODEL_ERROR")
    assert up.job_failed
    failed = await store.get_job(job.id)
    assert failed.status == Status.FAILED and failed.retry_count == 3
    assert failed.failure_reason == "MODEL_ERROR"
    assert "chunk 0 (0.0-30.0s) failed 3 times: transcriber exploded" in (failed.error_message or "")
    assert (await store.get_job(other.id)).status == Status.QUEUED  # other jobs unaffected


async def test_attempts_are_counted_for_the_whole_job(store: Store):
    job = await _create(store)
    claimed = await store.claim("w")
    lease = Lease(job.id, "w", claimed.lease_epoch)  # type: ignore[union-attr]
    await store.set_plan(lease, [Span(i, 10 * i, 10 * i + 10) for i in range(3)])
    assert not (await store.fail_chunk(lease, 0, "boom", "MODEL_ERROR")).job_failed
    assert not (await store.fail_chunk(lease, 1, "slow", "DEADLINE_EXCEEDED")).job_failed
    up = await store.fail_chunk(lease, 2, "all replicas failed", "TRANSCRIBER_UNAVAILABLE")
    assert up.job_failed and up.attempts == 1
    failed = await store.get_job(job.id)
    assert failed.failure_reason == "TRANSCRIBER_UNAVAILABLE" and "attempt 3 of 3" in (
        failed.error_message or ""
    )


async def test_fail_job_records_the_reason(store: Store):
    job = await _create(store)
    claimed = await store.claim("w")
    await store.fail_job(Lease(job.id, "w", claimed.lease_epoch), "no longer decodes", "UNDECODABLE_AUDIO")  # type: ignore[union-attr]
    failed = await store.get_job(job.id)
    assert failed.status == Status.FAILED and failed.failure_reason == "UNDECODABLE_AUDIO"
    assert failed.retry_count == 0


async def test_cancel_queued_and_running(store: Store):
    queued = await _create(store)
    running = await _create(store)
    await store.cancel(queued.id, "t1")
    assert (await store.get_job(queued.id)).status == Status.CANCELLED
    claimed = await store.claim("w")
    assert claimed is not None and claimed.id == running.id
    lease = Lease(running.id, "w", claimed.lease_epoch)
    await store.cancel(running.id, "t1")
    expires, cancelled = await store.heartbeat(lease)
    assert cancelled and expires is None
    with pytest.raises(Aborted, match="cancelled"):
        await store.complete_chunk(lease, 0, [], "en")
    again = await store.cancel(running.id, "t1")  # idempotent
    assert again.status == Status.CANCELLED


async def test_release_returns_the_job_without_counting_an_attempt(store: Store):
    job = await _create(store)
    for n in range(1, 2 * store.stalls_before_charge + store.max_attempts):
        claimed = await store.claim("w")
        assert claimed is not None and claimed.id == job.id  # no backoff: it left in good order
        await store.release(Lease(job.id, "w", claimed.lease_epoch))
        after = await store.get_job(job.id)
        assert (after.status, after.retry_count, after.interruption_count) == (Status.QUEUED, 0, n)
        assert after.worker_id is None and after.stall_count == 0 and after.not_before is None


async def test_list_pages_and_filters(store: Store):
    ids = [(await _create(store)).id for _ in range(7)]
    await _create(store, tenant="someone-else")
    await store.cancel(ids[0], "t1")
    seen: list[str] = []
    token = ""
    while True:
        page, token = await store.list_jobs("t1", page_size=3, page_token=token)
        assert len(page) <= 3
        seen += [j.id for j in page]
        if not token:
            break
    assert sorted(seen) == sorted(ids) and len(seen) == 7
    assert seen == list(reversed(ids))  # newest first
    cancelled, _ = await store.list_jobs("t1", status=Status.CANCELLED)
    assert [j.id for j in cancelled] == [ids[0]]
    with pytest.raises(InvalidInput, match="page_token"):
        await store.list_jobs("t1", page_token="garbage!")


async def test_queue_stats_agree_with_the_database(store: Store):
    for p in (Priority.HIGH, Priority.LOW, Priority.LOW, Priority.NORMAL, Priority.NORMAL, Priority.NORMAL):
        await _create(store, priority=p)
    await store.claim("w1")  # takes the HIGH one
    await store.claim("w2")  # a NORMAL one
    stats = await store.queue_stats()
    by = {s.priority: s for s in stats.priorities}
    async with store.sessions() as s:
        for p in Priority:
            pending = (
                await s.execute(select(func.count()).where(Job.priority == p, Job.status == Status.QUEUED))
            ).scalar_one()
            running = (
                await s.execute(select(func.count()).where(Job.priority == p, Job.status == Status.RUNNING))
            ).scalar_one()
            assert (by[p].pending, by[p].running) == (pending, running), p
    assert (by[Priority.HIGH].pending, by[Priority.HIGH].running) == (0, 1)
    assert (by[Priority.NORMAL].pending, by[Priority.NORMAL].running) == (2, 1)
    assert by[Priority.LOW].pending == 2 and by[Priority.LOW].oldest_wait > 0
    assert stats.workers == 2


async def test_watch_streams_state_then_changes_until_terminal(store: Store):
    job = await _create(store)
    events: list[tuple[str, int, str]] = []

    async def watch():
        async for j, partial in store.watch(job.id, "t1"):
            events.append((j.status, j.chunks_completed, partial))

    watcher = asyncio.create_task(watch())
    await asyncio.sleep(0.1)
    claimed = await store.claim("w")
    lease = Lease(job.id, "w", claimed.lease_epoch)  # type: ignore[union-attr]
    await store.set_plan(lease, [Span(0, 0, 10), Span(1, 10, 20)])
    await asyncio.sleep(0.05)
    await store.complete_chunk(lease, 0, [Segment(0, 5, "hello")], "en")
    await asyncio.sleep(0.05)
    await store.complete_chunk(lease, 1, [Segment(10, 15, "world")], "en")
    await asyncio.sleep(0.05)
    await store.complete_job(lease, "hello world", "en")
    await asyncio.wait_for(watcher, 5)
    assert events[0] == ("QUEUED", 0, "")
    assert ("RUNNING", 1, "hello") in events
    assert events[-1] == ("COMPLETED", 2, "hello world")


async def test_sweep_removes_expired_jobs_and_orphaned_blobs(store: Store):
    job = await _create(store)
    keep = await _create(store)
    await store.cancel(job.id)
    async with store.sessions.begin() as s:
        from sqlalchemy import update

        await s.execute(
            update(Job)
            .where(Job.id == job.id)
            .values(expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))
        )
    await store.blobs.write("orphan0000", _pieces(b"left over"))
    removed = await store.sweep(orphan_age=-1)
    assert removed == 2
    with pytest.raises(NotFound):
        await store.get_job(job.id)
    assert (await store.get_job(keep.id)).status == Status.QUEUED
    assert _blob_count(store) == 1


async def test_delete_removes_rows_and_audio(store: Store):
    job = await _create(store)
    claimed = await store.claim("w")
    await store.set_plan(Lease(job.id, "w", claimed.lease_epoch), [Span(0, 0, 5)])  # type: ignore[union-attr]
    await store.delete(job.id, "t1")
    with pytest.raises(NotFound):
        await store.chunks(job.id)
    assert _blob_count(store) == 0


async def test_retry_in_every_state(store: Store):
    """FAILED and CANCELLED go back to the queue with a fresh budget and the same id and request
    id; QUEUED and RUNNING are returned unchanged; COMPLETED is refused."""
    queued = await _create(store, request_id="q")
    assert (await store.retry(queued.id, "t1")).status == Status.QUEUED
    running_job = await _create(store)
    completed_job = await _create(store)
    failed_job = await _create(store, request_id="f")
    # queued (claim order is creation order): running_job is claimed second, after `queued`.
    await store.cancel(queued.id, "t1")
    claimed = await store.claim("w")
    assert claimed is not None and claimed.id == running_job.id
    running = await store.retry(running_job.id, "t1")
    assert running.status == Status.RUNNING and running.lease_epoch == claimed.lease_epoch

    c = await store.claim("w")
    assert c is not None and c.id == completed_job.id
    lease = Lease(c.id, "w", c.lease_epoch)
    await store.set_plan(lease, [Span(0, 0, 5)])
    await store.complete_chunk(lease, 0, [Segment(0, 5, "done")], "en")
    await store.complete_job(lease, "done", "en")
    with pytest.raises(WrongState) as err:
        await store.retry(completed_job.id, "t1")
    assert err.value.reason == "JOB_NOT_RETRYABLE"

    f = await store.claim("w")
    assert f is not None and f.id == failed_job.id
    lease = Lease(f.id, "w", f.lease_epoch)
    await store.set_plan(lease, [Span(0, 0, 5), Span(1, 5, 10)])
    await store.complete_chunk(lease, 0, [Segment(0, 5, "kept")], "en")
    for _ in range(3):
        up = await store.fail_chunk(lease, 1, "boom", "MODEL_ERROR")
    assert up.job_failed
    again = await store.retry(failed_job.id, "t1")
    assert (again.id, again.request_id, again.status) == (failed_job.id, "f", Status.QUEUED)
    assert (again.retry_count, again.interruption_count, again.failure_reason) == (0, 0, None)
    assert again.error_message is None and again.expires_at is None and again.completed_at is None
    chunks = await store.chunks(failed_job.id)
    assert [(ch.status, ch.attempts) for ch in chunks] == [("COMPLETED", 1), ("PENDING", 0)]
    assert chunks[0].text == "kept"
    # The same request_id keeps returning the same job.
    same, created = await store.create_job(_new(request_id="f"), _pieces(b"new upload"))
    assert not created and same.id == failed_job.id
    # A retried job runs again and its old holder is fenced out.
    r = await store.claim("w2")
    assert r is not None and r.id == failed_job.id and r.lease_epoch == f.lease_epoch + 1
    with pytest.raises(Aborted):
        await store.complete_chunk(lease, 1, [Segment(5, 10, "stale")], "en")

    cancelled = await store.retry(queued.id, "t1")
    assert cancelled.status == Status.QUEUED and cancelled.id == queued.id
    with pytest.raises(NotFound):
        await store.retry(queued.id, "someone-else")


async def test_retry_needs_the_audio_and_concurrent_retries_agree(store: Store):
    job = await _create(store)
    gone = await _create(store)
    for j in (job, gone):
        await store.cancel(j.id, "t1")
    assert await store.audio_retained([job, gone]) == {job.id, gone.id}
    await store.blobs.delete(gone.blob_key)
    assert await store.audio_retained([job, gone]) == {job.id}
    with pytest.raises(WrongState) as err:
        await store.retry(gone.id, "t1")
    assert err.value.reason == "AUDIO_NOT_KEPT"
    assert (await store.get_job(gone.id)).status == Status.CANCELLED
    results = await asyncio.gather(*[store.retry(job.id, "t1") for _ in range(5)])
    assert {r.status for r in results} == {Status.QUEUED}
    assert (await store.claim("w")).id == job.id  # type: ignore[union-attr]
    assert await store.claim("w") is None  # queued once
