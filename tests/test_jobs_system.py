"""Crash, takeover, fencing and Redis failure with real processes, PostgreSQL and Redis."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from services.shared.spool import Spool
from stt.client import AsyncClient, upload_requests
from stt.v1 import jobs_pb2
from tests.support import audio
from tests.support.cluster import Cluster, RedisServer
from tests.support.datastores import REDIS_URL, postgres_database, redis_prefix
from tests.support.procs import ROOT, free_port
from tests.support.speech import by_name, load_16k, real_clips
from tests.support.text import wer

pytestmark = pytest.mark.system

SLOW = {"STT_MAX_PARALLEL_WINDOWS": "1", "STT_DISPATCH_CONCURRENCY": "1"}  # one chunk at a time


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    async with postgres_database() as url, redis_prefix() as prefix:
        c = Cluster(url, REDIS_URL, prefix)
        try:
            yield c
        finally:
            await c.stop()


@pytest.fixture(scope="module")
def recording(long_clip) -> bytes:
    """About 2.5 minutes of speech: enough chunks to crash in the middle."""
    return audio.encode(np.concatenate([long_clip.samples, long_clip.samples]), "flac")


async def _wait_status(
    client: AsyncClient, job_id: str, statuses: tuple[int, ...], timeout: float = 120
) -> jobs_pb2.Job:
    deadline = time.monotonic() + timeout
    while True:
        job = await client.get_job(job_id)
        if job.status in statuses:
            return job
        assert time.monotonic() < deadline, f"job stuck in {jobs_pb2.JobStatus.Name(job.status)}"
        await asyncio.sleep(0.1)


async def _wait_chunks(client: AsyncClient, job_id: str, n: int) -> jobs_pb2.Job:
    async for event in client.watch_job(job_id):
        if event.job.chunks_completed >= n:
            return event.job
    raise AssertionError("job ended before reaching the chunk count")


async def _chunks(cluster: Cluster, job_id: str) -> list[tuple[int, int, int, float]]:
    conn = await cluster.db()
    try:
        rows = await conn.fetch(
            "SELECT idx, lease_epoch, attempts, extract(epoch from processed_at) AS t FROM chunks "
            "WHERE job_id=$1 ORDER BY idx",
            job_id,
        )
        return [(r["idx"], r["lease_epoch"], r["attempts"], float(r["t"])) for r in rows]
    finally:
        await conn.close()


async def _worker(cluster: Cluster, job_id: str) -> str:
    conn = await cluster.db()
    try:
        return str(await conn.fetchval("SELECT worker_id FROM jobs WHERE id=$1", job_id))
    finally:
        await conn.close()


async def test_gateway_killed_mid_job_another_gateway_finishes_it(
    cluster: Cluster, recording: bytes, long_clip
):
    t = await cluster.transcriber()
    await cluster.jobstore()
    g1 = await cluster.gateway([t], "g1", **SLOW)
    async with AsyncClient(g1.address) as c:
        reference = await c.submit(recording, request_id="reference")
        ref = await _wait_status(c, reference.job_id, (jobs_pb2.JOB_STATUS_COMPLETED,))
        ref_text = (await c.transcript(ref.job_id)).content
        job = await c.submit(recording, request_id="crash")
        await _wait_chunks(c, job.job_id, 2)
    await g1.kill()
    killed_at = time.time()
    g2 = await cluster.gateway([t], "g2", **SLOW)
    async with AsyncClient(g2.address) as c:
        done = await _wait_status(c, job.job_id, (jobs_pb2.JOB_STATUS_COMPLETED, jobs_pb2.JOB_STATUS_FAILED))
        assert done.status == jobs_pb2.JOB_STATUS_COMPLETED, done.error_message
        assert await _worker(cluster, job.job_id) == "g2"
        # Its worker was lost once: an interruption, not an attempt charged to the job.
        assert (done.retry_count, done.interruption_count) == (0, 1)
        text = (await c.transcript(job.job_id)).content
    assert text == ref_text  # the same transcript as an uninterrupted run
    assert wer(long_clip.text + " " + long_clip.text, text) <= 0.15
    chunks = await _chunks(cluster, job.job_id)
    before = [c for c in chunks if c[3] < killed_at]
    after = [c for c in chunks if c[3] >= killed_at]
    assert len(before) >= 2 and after
    assert all(epoch == 1 for _, epoch, _, _ in before)  # kept, not transcribed again
    assert all(epoch == 2 for _, epoch, _, _ in after)
    assert all(attempts == 1 for _, _, attempts, _ in chunks)
    assert "(resumed after 1 interruptions, 0 attempts charged)" in g2.log()


async def test_paused_holder_cannot_overwrite_the_new_holders_work(cluster: Cluster, recording: bytes):
    t = await cluster.transcriber()
    await cluster.jobstore()
    g1 = await cluster.gateway([t], "g1", **SLOW)
    async with AsyncClient(g1.address) as c:
        job = await c.submit(recording)
        await _wait_chunks(c, job.job_id, 1)
    g1.signal(signal.SIGSTOP)
    stopped_at = time.time()
    g2 = await cluster.gateway([t], "g2", **SLOW)
    async with AsyncClient(g2.address) as c:
        done = await _wait_status(c, job.job_id, (jobs_pb2.JOB_STATUS_COMPLETED, jobs_pb2.JOB_STATUS_FAILED))
        assert done.status == jobs_pb2.JOB_STATUS_COMPLETED and await _worker(cluster, job.job_id) == "g2"
        text = (await c.transcript(job.job_id)).content
        chunks_before = await _chunks(cluster, job.job_id)
        g1.signal(signal.SIGCONT)  # the old holder wakes up with work in flight
        deadline = time.monotonic() + 20
        while "lease lost" not in g1.log() and "stale lease" not in g1.log():
            assert time.monotonic() < deadline, g1.log()[-3000:]
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)
        after = await c.get_job(job.job_id)
        assert after.status == jobs_pb2.JOB_STATUS_COMPLETED and after.update_time == done.update_time
        assert (await c.transcript(job.job_id)).content == text
    assert await _chunks(cluster, job.job_id) == chunks_before
    assert all(epoch == 2 for _, epoch, _, t_ in chunks_before if t_ >= stopped_at)


async def test_redis_flushed_and_restarted_while_jobs_run(recording: bytes, short_clip):
    redis = RedisServer()
    await redis.start()
    async with postgres_database() as url:
        cluster = Cluster(url, redis.url, "stt-test")
        try:
            t = await cluster.transcriber()
            js = await cluster.jobstore()
            g = await cluster.gateway([t], "g1", STT_MAX_PARALLEL_WINDOWS="1", STT_DISPATCH_CONCURRENCY="2")
            async with AsyncClient(g.address) as c:
                jobs = [await c.submit(recording) for _ in range(2)]
                jobs.append(await c.submit(audio.encode(short_clip.samples, "wav")))
                watchers = [asyncio.create_task(c.wait(j.job_id)) for j in jobs]
                await _wait_chunks(c, jobs[0].job_id, 1)
                assert await redis.command("FLUSHALL") == "OK"
                await asyncio.sleep(0.5)
                redis.kill()
                await asyncio.sleep(1.5)
                more = await c.submit(
                    audio.encode(short_clip.samples, "wav")
                )  # submitted while Redis is down
                watchers.append(asyncio.create_task(c.wait(more.job_id)))
                await redis.start()
                finals = await asyncio.wait_for(asyncio.gather(*watchers), timeout=180)
            assert [f.status for f in finals] == [jobs_pb2.JOB_STATUS_COMPLETED] * 4
            assert js.log().count("subscribed to redis job events") >= 2  # it reconnected
        finally:
            await cluster.stop()
            redis.stop()


class Up:
    """`stt up` as a real subprocess (its own process group) on a fixed port and data directory."""

    def __init__(self, data: Path, port: int) -> None:
        self.data, self.port = data, port
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0
        self.env = {**os.environ, "STT_CPU_THREADS": "2", "STT_LOG_LEVEL": "INFO"}

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.starts += 1
        log = open(self.data.parent / f"up-{self.data.name}-{self.starts}.log", "wb")  # noqa: SIM115, ASYNC230
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "stt.cli", "up", "--port", str(self.port), "--data-dir", str(self.data),
            stdout=log, stderr=log, cwd=ROOT, env=self.env, start_new_session=True,
        )  # fmt: skip
        log.close()
        async with AsyncClient(self.address) as c:
            deadline = time.monotonic() + 120
            while True:
                with contextlib.suppress(Exception):
                    if (await c.health(timeout=1)).get("dependency/transcribers") == "SERVING":
                        return
                assert self.proc.returncode is None, "stt up exited"
                assert time.monotonic() < deadline, "stt up did not become ready"
                await asyncio.sleep(0.1)

    async def kill(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        await self.proc.wait()

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 60)
            except TimeoutError:
                await self.kill()

    def spool_files(self) -> list[str]:
        """Scratch files of any process: uploads and job audio (gateway), half-written blobs."""
        return Spool(str(self.data / "spool")).files() + Spool(str(self.data / "blobs" / ".tmp")).files()

    def blob_keys(self) -> set[str]:
        root = self.data / "blobs"
        return {
            f.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") for f in d.iterdir()
        }


def _mixed_jobs(long_clip: audio.Clip, short_clip: audio.Clip) -> list[tuple[str, bytes]]:
    """20 recordings, 3 s to 146 s: every real one as committed (FLAC at 8, 16, 22.05 kHz), four
    of them in other containers, and spoken long and short clips."""
    jobs = [(c.name, c.path.read_bytes()) for c in real_clips()]
    for name, fmt in (("harvard_osr_0030_8k", "mp3"), ("jfk_inaugural_16k", "ogg"),
                      ("librispeech_2412-153948-0000", "m4a"), ("ami_ES2011a_headset0_40-46s", "wav")):  # fmt: skip
        jobs.append((f"{name}.{fmt}", audio.encode(load_16k(by_name(name)), fmt)))
    twice = np.concatenate([long_clip.samples, long_clip.samples])
    jobs += [("long.flac", audio.encode(long_clip.samples, "flac")), ("twice.mp3", audio.encode(twice, "mp3")),
             ("short.wav", audio.encode(short_clip.samples, "wav")), ("short.ogg", audio.encode(short_clip.samples, "ogg")),
             ("twice.flac", audio.encode(twice, "flac"))]  # fmt: skip
    assert len(jobs) == 20 and len(jobs[-1][1]) > 1 << 20  # the last is uploaded in many pieces
    return jobs


async def _all_done(c: AsyncClient, ids: list[str], timeout: float = 600) -> list[jobs_pb2.Job]:
    return [await _wait_status(c, i, TERMINAL, timeout) for i in ids]


TERMINAL = (jobs_pb2.JOB_STATUS_COMPLETED, jobs_pb2.JOB_STATUS_FAILED, jobs_pb2.JOB_STATUS_CANCELLED)


async def _progress(c: AsyncClient, ids: list[str]) -> tuple[int, int, int]:
    """(chunks completed, jobs completed, jobs running) over the jobs."""
    wanted = set(ids)
    jobs = [j for j in (await c.list_jobs(page_size=100)).jobs if j.job_id in wanted]
    return (
        sum(j.chunks_completed for j in jobs),
        sum(j.status == jobs_pb2.JOB_STATUS_COMPLETED for j in jobs),
        sum(j.status == jobs_pb2.JOB_STATUS_RUNNING for j in jobs),
    )


async def _until(c: AsyncClient, ids: list[str], test, timeout: float = 180) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not test(await _progress(c, ids)):
        assert time.monotonic() < deadline, await _progress(c, ids)
        await asyncio.sleep(0.05)


@pytest.mark.slow
async def test_stt_up_killed_five_times_during_20_jobs_loses_nothing_charges_nothing_leaves_nothing(
    tmp_path: Path, long_clip, short_clip
):
    """kill -9 of the whole stack five times (once mid-upload) while 20 jobs of real and spoken
    recordings run: every job COMPLETES with the transcript of an undisturbed run, no attempt is
    charged, no job or blob is duplicated or orphaned, and no scratch file is left on disk."""
    jobs = _mixed_jobs(long_clip, short_clip)
    # The undisturbed run.
    ref = Up(tmp_path / "reference", free_port())
    await ref.start()
    try:
        async with AsyncClient(ref.address) as c:
            ids = [(await c.submit(data, filename=name, request_id=name)).job_id for name, data in jobs]
            finals = await _all_done(c, ids)
            assert all(f.status == jobs_pb2.JOB_STATUS_COMPLETED for f in finals)
            reference = [(await c.transcript(i)).content for i in ids]
    finally:
        await ref.stop()
    assert sum(bool(t.strip()) for t in reference) == 20

    up = Up(tmp_path / "data", free_port())
    await up.start()
    try:
        release = asyncio.Event()
        async with AsyncClient(up.address) as c:
            ids = [(await c.submit(data, filename=name, request_id=name)).job_id for name, data in jobs[:19]]
            # 1: in the middle of an upload (the gateway has spooled part of it).
            name, data = jobs[19]
            reqs = upload_requests(data, filename=name, priority="normal", request_id=name,
                                   config=jobs_pb2.JobMetadata().config)  # fmt: skip

            async def half() -> AsyncIterator[jobs_pb2.CreateJobRequest]:
                for r in reqs[: max(2, len(reqs) // 2)]:
                    yield r
                await release.wait()

            upload = asyncio.ensure_future(c.jobs.CreateJob(half(), timeout=120))
            deadline = time.monotonic() + 60
            while not [f for f in up.spool_files() if "upload-" in f]:
                assert time.monotonic() < deadline and not upload.done()
                await asyncio.sleep(0.02)
            await up.kill()
            release.set()
            with pytest.raises((grpc.aio.AioRpcError, asyncio.CancelledError)):
                await upload  # the client sees the upload fail (grpc.aio reports it either way)
        assert [f for f in up.spool_files() if "upload-" in f]  # the crash left it...
        await up.start()
        async with AsyncClient(up.address) as c:
            assert not [f for f in up.spool_files() if "upload-" in f]  # ...the restart removed it
            ids.append((await c.submit(jobs[19][1], filename=jobs[19][0], request_id=jobs[19][0])).job_id)
            # 2: once some chunk has been transcribed since the restart.
            chunks, _, _ = await _progress(c, ids)
            await _until(c, ids, lambda p: p[0] > chunks)
        await up.kill()
        await up.start()
        async with AsyncClient(up.address) as c:
            # 3: as soon as jobs run again (they are still decoding or planning).
            await _until(c, ids, lambda p: p[2] > 0)
        await up.kill()
        await up.start()
        async with AsyncClient(up.address) as c:
            # 4: once one more job has completed.
            _, completed, _ = await _progress(c, ids)
            await _until(c, ids, lambda p: p[1] > completed or p[1] == 20)
        await up.kill()
        await up.start()
        async with AsyncClient(up.address) as c:
            # 5: in the middle of the work again.
            chunks, _, _ = await _progress(c, ids)
            await _until(c, ids, lambda p: p[0] > chunks or p[1] == 20)
        await up.kill()
        await up.start()
        async with AsyncClient(up.address) as c:
            finals = await _all_done(c, ids)
            assert [jobs_pb2.JobStatus.Name(f.status) for f in finals] == ["JOB_STATUS_COMPLETED"] * 20, [
                f.error_message for f in finals
            ]
            assert [f.retry_count for f in finals] == [0] * 20  # nothing charged
            assert sum(f.interruption_count for f in finals) >= 4
            texts = [(await c.transcript(i)).content for i in ids]
            listed = (await c.list_jobs(page_size=100)).jobs
        for (name, _), want, got in zip(jobs, reference, texts, strict=True):
            assert got == want, name
        assert len(listed) == 20 and sorted(j.request_id for j in listed) == sorted(n for n, _ in jobs)
        assert up.blob_keys() <= set(ids)  # no orphaned audio
        assert up.spool_files() == []  # nothing half-written left anywhere
    finally:
        await up.stop()
    assert up.spool_files() == []
