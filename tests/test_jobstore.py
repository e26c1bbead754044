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


async def test_migrations_upgrade_an_empty_database_and_back(store: Store):
    engine = store.engine  # type: ignore[attr-defined]
    async with engine.connect() as conn:
        version = (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalar_one()
    assert version == ScriptDirectory.from_config(migrate.alembic_config("sqlite://")).get_current_head()
    await migrate.downgrade(engine, "base")
    await migrate.upgrade(engine)
    await _create(store)


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
    assert os.listdir(store.blobs.tmp) == []  # type: ignore[attr-defined]


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


async def test_lease_expiry_requeues_with_retry_then_fails_past_max_attempts(store: Store):
    job = await _create(store)
    for attempt in range(1, 4):
        claimed = await store.claim("w", lease_seconds=0.05)
        assert claimed is not None and claimed.lease_epoch == attempt
        await asyncio.sleep(0.1)
        await store.reap_expired()
        after = await store.get_job(job.id)
        assert after.retry_count == attempt
    assert after.status == Status.FAILED
    assert "lease expired" in (after.error_message or "")
    assert after.expires_at is not None


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
    await store.set_plan(lease, [Span(0, 0, 30)])
    for attempt in (1, 2):
        up = await store.fail_chunk(lease, 0, "transcriber exploded")
        assert up.attempts == attempt and not up.job_failed
    up = await store.fail_chunk(lease, 0, "transcriber exploded")
    assert up.job_failed
    failed = await store.get_job(job.id)
    assert failed.status == Status.FAILED
    assert "chunk 0 (0.0-30.0s) failed 3 times: transcriber exploded" in (failed.error_message or "")
    assert (await store.get_job(other.id)).status == Status.QUEUED  # other jobs unaffected


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
    claimed = await store.claim("w")
    await store.release(Lease(job.id, "w", claimed.lease_epoch))  # type: ignore[union-attr]
    after = await store.get_job(job.id)
    assert after.status == Status.QUEUED and after.retry_count == 0 and after.worker_id is None


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
