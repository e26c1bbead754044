"""Data at rest in the jobstore: audio removed when a job completes unless kept, the store's own
size limit and quotas, and encryption of stored audio and transcripts (real SQLite and PostgreSQL,
real files)."""

from __future__ import annotations

import base64
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import text

from services.jobstore import db, migrate
from services.jobstore.blobs import FileBlobStore
from services.jobstore.crypto import Sealer, SealError
from services.jobstore.events import EventBus
from services.jobstore.models import Priority, Status
from services.jobstore.store import Lease, NewJob, Span, Store
from services.shared.domain import Segment
from services.shared.errors import LimitExceeded, QuotaExceeded, WrongState
from tests.support.datastores import postgres_database

KEY1 = os.urandom(32)
KEY2 = os.urandom(32)
AUDIO = b"RIFF" + os.urandom(3000) + b"the audio payload " * 1000
SECRET_TEXT = "the patient's name is Alice Example"


@pytest.fixture(params=["sqlite", "postgres"])
async def make_store(request, tmp_path) -> AsyncIterator:
    """A factory of Stores on one database and blob directory (so a test can change the key)."""
    engines = []

    async def factory(url: str):
        async def make(sealer: Sealer | None = None, **kw) -> Store:
            engine = db.create_engine(url)
            engines.append(engine)
            await migrate.upgrade(engine)
            st = Store(db.sessionmaker(engine), FileBlobStore(str(tmp_path / "blobs")), EventBus(),
                       reconcile_seconds=0.2, sealer=sealer, **kw)  # fmt: skip
            st.engine = engine  # type: ignore[attr-defined]
            return st

        return make

    try:
        if request.param == "sqlite":
            yield await factory(f"sqlite+aiosqlite:///{tmp_path}/jobs.db")
        else:
            async with postgres_database() as url:
                yield await factory(url)
                for e in engines:
                    await e.dispose()
                engines.clear()
    finally:
        for e in engines:
            await e.dispose()


async def _pieces(data: bytes, size: int = 1000) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def _new(tenant: str = "t1", **kw) -> NewJob:
    return NewJob(tenant, None, "a.wav", Priority.NORMAL, "en", {"language_code": "en"}, 12.5, 3, **kw)


def _blob_files(store: Store) -> list[Path]:
    root = Path(store.blobs.root)  # type: ignore[attr-defined]
    return [p for p in root.rglob("*") if p.is_file() and ".tmp" not in p.parts]


async def _complete(store: Store, job_id: str, transcript: str = SECRET_TEXT) -> None:
    claimed = await store.claim("w")
    assert claimed is not None and claimed.id == job_id
    lease = Lease(job_id, "w", claimed.lease_epoch)
    await store.set_plan(lease, [Span(0, 0, 12.5)])
    await store.complete_chunk(lease, 0, [Segment(0, 12, transcript)], "en")
    await store.complete_job(lease, transcript, "en")


async def _read(store: Store, job_id: str, tenant: str | None = "t1") -> bytes:
    return b"".join([p async for p in store.read_audio(job_id, tenant)])


async def test_audio_is_deleted_when_a_job_completes_unless_kept(make_store):
    store = await make_store()
    plain, _ = await store.create_job(_new(), _pieces(AUDIO))
    kept, _ = await store.create_job(_new(keep_audio=True), _pieces(AUDIO))
    assert len(_blob_files(store)) == 2 and (await store.tenant_usage("t1")).stored_audio_bytes == 2 * len(
        AUDIO
    )
    await _complete(store, plain.id)
    await _complete(store, kept.id)
    assert len(_blob_files(store)) == 1
    assert (
        not (await store.get_job(plain.id)).audio_retained and (await store.get_job(kept.id)).audio_retained
    )
    assert await _read(store, kept.id) == AUDIO
    with pytest.raises(WrongState) as err:
        await _read(store, plain.id)
    assert err.value.reason == "AUDIO_NOT_KEPT"
    assert (await store.tenant_usage("t1")).stored_audio_bytes == len(AUDIO)


async def test_failed_and_cancelled_jobs_keep_their_audio_for_retry(make_store):
    store = await make_store()
    job, _ = await store.create_job(_new(), _pieces(AUDIO))
    claimed = await store.claim("w")
    await store.fail_job(Lease(job.id, "w", claimed.lease_epoch), "boom")  # type: ignore[union-attr]
    assert (await store.get_job(job.id)).audio_retained and len(_blob_files(store)) == 1
    again = await store.retry(job.id, "t1")
    assert again.status == Status.QUEUED
    await _complete(store, job.id)
    assert _blob_files(store) == []


async def test_the_store_enforces_its_own_size_limit_and_tenant_quotas(make_store):
    store = await make_store(max_blob_bytes=len(AUDIO) - 1)
    with pytest.raises(LimitExceeded) as err:
        await store.create_job(_new(), _pieces(AUDIO))
    assert err.value.reason == "AUDIO_TOO_LARGE" and _blob_files(store) == []
    store.max_blob_bytes = None
    await store.create_job(_new(max_queued_jobs=2), _pieces(AUDIO))
    await store.create_job(_new(max_queued_jobs=2), _pieces(AUDIO))
    with pytest.raises(QuotaExceeded) as quota:
        await store.create_job(_new(max_queued_jobs=2), _pieces(AUDIO))
    assert quota.value.quota == "queued_jobs" and quota.value.subject == "tenant:t1"
    await store.create_job(_new("t2", max_queued_jobs=2), _pieces(AUDIO))  # per tenant
    with pytest.raises(QuotaExceeded) as stored:
        await store.create_job(_new(max_stored_audio_bytes=3 * len(AUDIO) - 1), _pieces(AUDIO))
    assert stored.value.quota == "stored_audio_bytes" and len(_blob_files(store)) == 3


async def test_encrypted_audio_and_transcripts_are_unreadable_on_disk(make_store):
    store = await make_store(Sealer(KEY1))
    job, _ = await store.create_job(_new(keep_audio=True), _pieces(AUDIO))
    (blob,) = _blob_files(store)
    on_disk = blob.read_bytes()
    assert b"the audio payload" not in on_disk and len(on_disk) > len(AUDIO)
    assert job.size_bytes == len(AUDIO)
    assert await _read(store, job.id) == AUDIO
    await _complete(store, job.id)
    async with store.engine.connect() as conn:  # type: ignore[attr-defined]
        rows = (
            await conn.execute(text("SELECT transcript FROM jobs UNION ALL SELECT text FROM chunks"))
        ).all()
        segs = (await conn.execute(text("SELECT segments_json FROM chunks"))).scalar_one()
    assert all(r[0].startswith("enc1:") and "Alice" not in r[0] for r in rows) and "Alice" not in segs
    assert (await store.get_job(job.id)).transcript == SECRET_TEXT
    assert [c.text for c in await store.chunks(job.id, "t1")] == [SECRET_TEXT]
    assert await store.partial_text(job.id) == SECRET_TEXT
    # A rotated key still reads what the old one sealed; without it nothing can be read.
    rotated = await make_store(Sealer(KEY2, [KEY1]))
    assert await _read(rotated, job.id) == AUDIO and (await rotated.get_job(job.id)).transcript == SECRET_TEXT
    stranger = await make_store(Sealer(KEY2))
    with pytest.raises(SealError):
        await _read(stranger, job.id)


async def test_tampered_or_cut_blobs_fail_to_open(make_store):
    store = await make_store(Sealer(KEY1))
    job, _ = await store.create_job(_new(keep_audio=True), _pieces(AUDIO))
    (blob,) = _blob_files(store)
    sealed = blob.read_bytes()
    for broken in (
        sealed[:-10],
        sealed[: len(sealed) // 2],
        sealed[:40] + bytes([sealed[40] ^ 1]) + sealed[41:],
    ):
        blob.write_bytes(broken)
        with pytest.raises(SealError):
            await _read(store, job.id)


async def test_data_written_before_encryption_stays_readable(make_store):
    plain_store = await make_store()
    job, _ = await plain_store.create_job(_new(keep_audio=True), _pieces(AUDIO))
    store = await make_store(Sealer(KEY1))
    assert await _read(store, job.id) == AUDIO


def test_encryption_key_must_be_32_bytes_of_base64():
    with pytest.raises(ValueError):
        Sealer.from_settings("not base64!", None)
    with pytest.raises(ValueError):
        Sealer.from_settings(base64.b64encode(b"short").decode(), None)
    assert Sealer.from_settings(base64.b64encode(KEY1).decode(), None).enabled
