"""Crash, takeover, fencing and Redis failure with real processes, PostgreSQL and Redis."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator

import numpy as np
import pytest

from stt.client import AsyncClient
from stt.v1 import jobs_pb2
from tests.support import audio
from tests.support.cluster import Cluster, RedisServer
from tests.support.datastores import REDIS_URL, postgres_database, redis_prefix
from tests.support.procs import ROOT, free_port
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
        assert done.retry_count == 1 and await _worker(cluster, job.job_id) == "g2"
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
    assert "(resumed, attempt 2)" in g2.log()


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


async def test_stt_up_killed_with_three_jobs_resumes_them_after_restart(
    tmp_path, recording: bytes, long_clip
):
    port = free_port()
    data = tmp_path / "data"
    env = {**os.environ, "STT_CPU_THREADS": "2", "STT_LOG_LEVEL": "INFO", **SLOW}

    async def up() -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "stt.cli", "up", "--port", str(port), "--data-dir", str(data),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, cwd=ROOT, env=env,
            start_new_session=True,
        )  # fmt: skip

    async def ready(c: AsyncClient) -> None:
        for _ in range(600):
            try:
                if (await c.health(timeout=1)).get("dependency/transcribers") == "SERVING":
                    return
            except Exception:
                pass
            await asyncio.sleep(0.1)
        raise TimeoutError("stt up did not become ready")

    proc = await up()
    try:
        async with AsyncClient(f"127.0.0.1:{port}") as c:
            await ready(c)
            jobs = [await c.submit(recording, request_id=f"job-{i}") for i in range(3)]
            await _wait_chunks(c, jobs[0].job_id, 1)
        os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        proc = await up()
        async with AsyncClient(f"127.0.0.1:{port}") as c:
            await ready(c)
            finals = [
                await _wait_status(
                    c, j.job_id, (jobs_pb2.JOB_STATUS_COMPLETED, jobs_pb2.JOB_STATUS_FAILED), 300
                )
                for j in jobs
            ]
            assert [f.status for f in finals] == [jobs_pb2.JOB_STATUS_COMPLETED] * 3
            assert finals[0].retry_count == 1  # it was running when the process died
            for f in finals:
                assert (
                    wer(long_clip.text + " " + long_clip.text, (await c.transcript(f.job_id)).content) <= 0.15
                )
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGTERM)
            await proc.wait()
