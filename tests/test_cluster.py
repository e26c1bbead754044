"""System tests on the local cluster (`make cluster`): jobstore on PostgreSQL + Redis, two gateways,
three transcribers, each a real process on loopback."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import AsyncIterator

import numpy as np
import pytest

from services.cluster import LocalCluster, ServiceProcess
from stt.client import AsyncClient
from stt.errors import SttError
from stt.v1 import jobs_pb2
from tests.support import audio
from tests.support.datastores import REDIS_URL, postgres_database, redis_prefix
from tests.support.metrics import metric, scrape
from tests.support.text import wer

pytestmark = pytest.mark.system

ENV = {"STT_LOG_LEVEL": "INFO"}
GATEWAY_ENV = {
    "STT_JOB_LEASE_SECONDS": "4",
    "STT_JOB_HEARTBEAT_SECONDS": "0.5",
    "STT_MAX_PARALLEL_WINDOWS": "4",
}
JOBSTORE_ENV = {"STT_REAP_INTERVAL_SECONDS": "0.3", "STT_RECONCILE_SECONDS": "1"}


@pytest.fixture
async def cluster() -> AsyncIterator[LocalCluster]:
    async with postgres_database() as url, redis_prefix() as prefix:
        c = LocalCluster(
            url, REDIS_URL, prefix, common_env=ENV, gateway_env=GATEWAY_ENV, jobstore_env=JOBSTORE_ENV
        )
        try:
            await c.start(transcribers=3, gateways=2)
            yield c
        finally:
            await c.stop()


@pytest.fixture(scope="module")
def recording(long_clip) -> bytes:
    return audio.encode(np.concatenate([long_clip.samples, long_clip.samples]), "flac")


def transcribe_calls(p: ServiceProcess) -> float:
    return metric(scrape(p), "stt_rpc_total", method="/stt.internal.v1.Transcriber/Transcribe", code="OK")


async def _done(client: AsyncClient, job_id: str, timeout: float = 180) -> jobs_pb2.Job:
    return await asyncio.wait_for(client.wait(job_id), timeout)


async def test_work_spreads_over_all_transcribers_and_metrics_are_exposed(
    cluster: LocalCluster, long_clip, short_clip
):
    # 2.5 x the long clip (182 s) plans 7 windows of up to 30 s: one transcriber of three would get 3.
    half = long_clip.samples[: long_clip.samples.shape[0] // 2]
    uneven = audio.encode(np.concatenate([long_clip.samples, long_clip.samples, half]), "flac")
    async with AsyncClient(cluster.gateway_target) as c:
        job = await c.submit(uneven, language="en")
        wav = audio.encode(short_clip.samples, "wav")
        results = await asyncio.gather(*[c.recognize(wav) for _ in range(6)])
        assert all(wer(short_clip.text, r.transcript) <= 0.15 for r in results)
        done = await _done(c, job.job_id)
        assert done.status == jobs_pb2.JOB_STATUS_COMPLETED
        # The job's windows were cut again so each of the 3 transcribers got as many.
        assert done.chunks_total % len(cluster.transcribers) == 0, done.chunks_total
    calls = [transcribe_calls(t) for t in cluster.transcribers]
    assert all(n > 0 for n in calls), calls
    t_metrics = scrape(cluster.transcribers[0])
    for name in (
        "stt_transcriber_batch_size_count",
        "stt_transcriber_real_time_factor_count",
        "stt_rpc_seconds_bucket",
    ):
        assert name in t_metrics
    assert cluster.jobstore is not None
    await asyncio.sleep(5.5)  # queue gauges are refreshed every 5 s
    js = scrape(cluster.jobstore)
    assert 'stt_jobs_queued{priority="HIGH"}' in js and "stt_jobs_running" in js
    gw = "".join(scrape(g) for g in cluster.gateways)
    assert "stt_dispatcher_job_seconds_count" in gw and "stt_gateway_streams" in gw


async def test_transcriber_killed_mid_job_gives_the_same_transcript(cluster: LocalCluster, recording):
    async with AsyncClient(cluster.gateway_target) as c:
        ref = await _done(c, (await c.submit(recording)).job_id)
        ref_text = (await c.transcript(ref.job_id)).content
        job = await c.submit(recording)
        async for event in c.watch_job(job.job_id):
            if event.job.chunks_completed >= 1:
                break
        victim = max(cluster.transcribers, key=transcribe_calls)
        await victim.kill()
        done = await _done(c, job.job_id)
        assert done.status == jobs_pb2.JOB_STATUS_COMPLETED, done.error_message
        assert (await c.transcript(job.job_id)).content == ref_text


async def test_a_new_transcriber_gets_work_without_restarting_gateways(cluster: LocalCluster, short_clip):
    fourth = await cluster.add_transcriber()
    wav = audio.encode(short_clip.samples, "wav")
    deadline = time.monotonic() + 30
    async with AsyncClient(cluster.gateway_target) as c:
        while transcribe_calls(fourth) == 0:
            assert time.monotonic() < deadline, "the new transcriber got no work"
            await asyncio.gather(*[c.recognize(wav) for _ in range(4)])
    assert time.monotonic() < deadline


async def test_rolling_restart_loses_no_job_and_shows_no_error(cluster: LocalCluster, short_clip):
    wav = audio.encode(short_clip.samples, "wav")
    errors: list[BaseException] = []
    jobs: list[str] = []
    stop = asyncio.Event()

    async def submitter(c: AsyncClient) -> None:
        i = 0
        while not stop.is_set():
            try:
                jobs.append((await c.submit(wav, request_id=f"rolling-{i}")).job_id)
            except SttError as exc:
                errors.append(exc)
            i += 1
            await asyncio.sleep(0.3)

    async with AsyncClient(cluster.gateway_target) as c:
        task = asyncio.create_task(submitter(c))
        assert cluster.jobstore is not None
        for p in [*cluster.transcribers, cluster.jobstore, *cluster.gateways]:
            p.signal(15)  # SIGTERM: drain, then exit
            assert await p.wait_exit(60) == 0, p.log()[-2000:]
            await p.start()
            await asyncio.sleep(1.5)  # let gateways see it come back
        stop.set()
        await task
        assert not errors, errors
        assert len(jobs) > 10
        finals = await asyncio.gather(*[_done(c, j, 240) for j in jobs])
    assert [f.status for f in finals] == [jobs_pb2.JOB_STATUS_COMPLETED] * len(jobs)
    assert len(set(jobs)) == len(jobs)


async def test_rolling_sigterm_of_every_gateway_during_long_jobs_charges_no_attempt(
    cluster: LocalCluster, recording, long_clip
):
    """Each gateway in turn drains (SIGTERM) while it holds long jobs: it hands them back, another
    gateway resumes them from their last chunk, and nothing is charged to the jobs."""
    async with AsyncClient(cluster.gateway_target) as c:
        ref = await _done(c, (await c.submit(recording)).job_id, 240)
        ref_text = (await c.transcript(ref.job_id)).content
        ids = [(await c.submit(recording, request_id=f"long-{i}")).job_id for i in range(3)]

        async def held() -> dict[str, jobs_pb2.Job]:
            return {i: await c.get_job(i) for i in ids}

        for gateway in list(cluster.gateways):
            deadline = time.monotonic() + 120
            while True:  # the jobs are under way (at least one chunk done on each running job)
                jobs = await held()
                running = [j for j in jobs.values() if j.status == jobs_pb2.JOB_STATUS_RUNNING]
                if running and all(j.chunks_completed >= 1 for j in running):
                    break
                assert time.monotonic() < deadline, jobs
                await asyncio.sleep(0.1)
            gateway.signal(15)
            assert await gateway.wait_exit(60) == 0, gateway.log()[-2000:]
            await gateway.start()
        finals = [await _done(c, i, 300) for i in ids]
        texts = [(await c.transcript(i)).content for i in ids]
    assert [f.status for f in finals] == [jobs_pb2.JOB_STATUS_COMPLETED] * 3
    assert [f.retry_count for f in finals] == [0, 0, 0]  # no attempt charged
    assert sum(f.interruption_count for f in finals) >= 2  # each drain handed work back
    assert texts == [ref_text] * 3
    logs = "".join(g.log() for g in cluster.gateways)
    assert logs.count("job handed back on shutdown") >= 2
    assert cluster.jobstore is not None
    assert "worker lost" not in cluster.jobstore.log()  # every job was handed back, none timed out


def _pg(action: str) -> None:
    version = sorted(os.listdir("/etc/postgresql"))[0]
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", action], check=True, timeout=60
    )


def _pg_ready() -> bool:
    return subprocess.run(["pg_isready", "-h", "127.0.0.1", "-q"], check=False).returncode == 0


async def test_postgres_restarted_during_a_job(cluster: LocalCluster, recording, long_clip):
    if not os.path.isdir("/etc/postgresql") or os.geteuid() != 0:
        pytest.skip("needs a local PostgreSQL cluster this test may restart (root)")
    async with AsyncClient(cluster.gateway_target) as c:
        job = await c.submit(recording)
        async for event in c.watch_job(job.job_id):
            if event.job.chunks_completed >= 1:
                break
        try:
            await asyncio.to_thread(_pg, "restart")
        finally:
            for _ in range(100):
                if _pg_ready():
                    break
                await asyncio.sleep(0.2)
            else:
                await asyncio.to_thread(_pg, "start")
        done = await _done(c, job.job_id)
        assert done.status == jobs_pb2.JOB_STATUS_COMPLETED, done.error_message
        text = (await c.transcript(job.job_id)).content
        assert wer(long_clip.text + " " + long_clip.text, text) <= 0.15
    logs = "".join(p.log() for p in cluster.processes)
    assert "unavailable" in logs.lower()  # the outage was seen, and ridden out
