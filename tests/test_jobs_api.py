"""The Jobs API end to end through real gRPC: gateway (with dispatcher) + jobstore + transcriber."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY

from services.gateway.dispatcher import Dispatcher
from services.gateway.server import Gateway
from services.gateway.server import create_server as create_gateway
from services.jobstore.server import JobstoreApp
from services.jobstore.server import create_server as create_jobstore
from services.shared.errors import InvalidInput, Unavailable
from services.transcriber.server import Transcriber
from stt.client import AsyncClient, upload_requests
from stt.errors import SttError
from stt.v1 import jobs_pb2
from tests.conftest import gateway_settings, jobstore_settings, wait_serving
from tests.support import audio
from tests.support.text import wer


async def _stack(transcriber: Transcriber, data_dir: str, **gw: object) -> tuple[JobstoreApp, Gateway]:
    js = await create_jobstore(jobstore_settings(data_dir), port=0)
    gw.setdefault("spool_dir", os.path.join(data_dir, "spool"))
    g = await create_gateway(
        gateway_settings(f"127.0.0.1:{transcriber.port}", jobstore_address=f"127.0.0.1:{js.port}", **gw),
        port=0,
    )
    await wait_serving(g)
    return js, g


@pytest.fixture
async def one_slot(transcriber, tmp_path) -> AsyncIterator[tuple[AsyncClient, Gateway, JobstoreApp]]:
    """A stack whose dispatcher runs one job at a time."""
    js, g = await _stack(transcriber, str(tmp_path), dispatch_concurrency=1, max_parallel_windows=2)
    async with AsyncClient(f"127.0.0.1:{g.port}") as c:
        yield c, g, js
    await g.stop(0)
    await js.stop(0)


async def test_submit_watch_and_transcripts(client: AsyncClient, gateway: Gateway, long_clip):
    # Windows go to the transcribers in groups of their batch capacity and a group's chunks finish
    # together; one window per group here. Groups still reach the transcriber together (its batcher
    # may put them in one call) and a chunk is recorded only once the whole plan is, so chunks can
    # be written in one burst that a watcher sees only as its end (CI once saw no partial text): the
    # windows after the first wait until the watcher has seen partial text (at most 30 s; then the
    # assertion below fails).
    d = gateway.dispatcher
    assert d is not None
    capacity, real_transcribe = d.batch_capacity, d.transcribe
    seen_partial = asyncio.Event()
    calls = 0

    async def paced(samples, options, work_class):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        if calls > 1:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(seen_partial.wait(), 30)
        return await real_transcribe(samples, options, work_class)

    d.batch_capacity = lambda: 1
    d.transcribe = paced  # type: ignore[method-assign]
    try:
        await _submit_watch_and_transcripts(client, long_clip, seen_partial)
    finally:
        d.batch_capacity, d.transcribe = capacity, real_transcribe  # type: ignore[method-assign]


async def _submit_watch_and_transcripts(
    client: AsyncClient, long_clip: audio.Clip, seen_partial: asyncio.Event
) -> None:
    job = await client.submit(audio.encode(long_clip.samples, "flac"), filename="talk.flac", language="en")
    assert job.status == jobs_pb2.JOB_STATUS_QUEUED and job.filename == "talk.flac"
    assert abs(job.audio_duration_seconds - long_clip.seconds) < 0.2
    events = []
    async for e in client.watch_job(job.job_id):
        events.append(e)
        if e.job.status == jobs_pb2.JOB_STATUS_RUNNING and e.partial_transcript:
            seen_partial.set()
    assert events[-1].job.status == jobs_pb2.JOB_STATUS_COMPLETED
    done = [e.job.chunks_completed for e in events]
    assert done == sorted(done) and events[-1].job.chunks_total >= 3
    partials = [
        e.partial_transcript
        for e in events
        if e.job.status == jobs_pb2.JOB_STATUS_RUNNING and e.partial_transcript
    ]
    assert partials, "watchers see partial text while the job runs"
    text = await client.transcript(job.job_id)
    assert wer(long_clip.text, text.content) <= 0.15
    doc = json.loads((await client.transcript(job.job_id, "json")).content)
    words = [w for seg in doc["segments"] for w in seg["words"]]
    assert words and [w["start"] for w in words] == sorted(w["start"] for w in words)
    assert words[-1]["end"] <= long_clip.seconds + 0.05
    srt = (await client.transcript(job.job_id, "srt")).content
    assert srt.startswith("1\n00:00:0")
    vtt = (await client.transcript(job.job_id, "vtt")).content
    assert vtt.startswith("WEBVTT")
    got = await client.get_job(job.job_id)
    assert (
        got.status == jobs_pb2.JOB_STATUS_COMPLETED and got.complete_time.seconds and got.expire_time.seconds
    )


async def test_same_request_id_makes_one_job(client: AsyncClient, short_clip):
    data = audio.encode(short_clip.samples, "wav")
    first = await client.submit(data, request_id="idem-42")
    second = await client.submit(data, request_id="idem-42")
    assert first.job_id == second.job_id
    listed = (await client.list_jobs(page_size=1000)).jobs
    assert sum(1 for j in listed if j.request_id == "idem-42") == 1


async def _count_jobs(client: AsyncClient) -> int:
    return len((await client.list_jobs(page_size=1000)).jobs)


def _blobs(js: JobstoreApp) -> int:
    root = js.store.blobs.root  # type: ignore[attr-defined]
    return sum(len(files) for d, _, files in os.walk(root) if ".tmp" not in d)


async def test_bad_uploads_leave_no_job(client: AsyncClient, jobstore: JobstoreApp, short_clip):
    before, blobs = await _count_jobs(client), _blobs(jobstore)
    wav = audio.encode(short_clip.samples, "wav")
    cases = [
        (wav[: len(wav) // 2], {}, grpc.StatusCode.INVALID_ARGUMENT, "truncated"),
        (b"\x00garbage" * 1000, {}, grpc.StatusCode.INVALID_ARGUMENT, "could not read the audio"),
        (b"", {}, grpc.StatusCode.INVALID_ARGUMENT, "empty"),
        (wav, {"language": "xx"}, grpc.StatusCode.INVALID_ARGUMENT, "unknown language"),
        (wav, {"encoding": "LINEAR16"}, grpc.StatusCode.INVALID_ARGUMENT, "sample_rate_hz"),
    ]
    for data, kw, code, msg in cases:
        with pytest.raises(SttError) as err:
            await client.submit(data, **kw)
        assert err.value.code == code and msg in err.value.message, (msg, err.value)
    # No metadata first.
    with pytest.raises(grpc.aio.AioRpcError) as rpc:
        await client.jobs.CreateJob(iter([jobs_pb2.CreateJobRequest(audio_chunk=b"abc")]), timeout=10)
    assert rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "metadata" in (rpc.value.details() or "")
    assert await _count_jobs(client) == before and _blobs(jobstore) == blobs


async def test_upload_over_the_size_limit_and_cut_off_uploads_leave_nothing(
    transcriber, tmp_path, short_clip
):
    js, g = await _stack(transcriber, str(tmp_path), max_job_bytes=200_000)
    try:
        async with AsyncClient(f"127.0.0.1:{g.port}") as c:
            with pytest.raises(SttError) as err:
                await c.submit(audio.encode(audio.silence(10), "wav"))  # 320 KB
            assert (
                err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
                and "200000 byte limit" in err.value.message
            )

            # A client that disappears half-way through its upload.
            reqs = upload_requests(
                audio.encode(short_clip.samples[: 16000 * 3], "wav"), filename="x.wav", priority="normal",
                request_id="cut-off", config=jobs_pb2.JobMetadata().config,
            )  # fmt: skip

            async def slow() -> AsyncIterator[jobs_pb2.CreateJobRequest]:
                for r in reqs[:2]:
                    yield r
                await asyncio.sleep(30)

            call = c.jobs.CreateJob(slow(), timeout=60)
            await asyncio.sleep(0.5)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            await asyncio.sleep(0.3)
            assert await _count_jobs(c) == 0
        assert _blobs(js) == 0
        assert g.jobs.spool.root == str(tmp_path / "spool") and g.jobs.spool.files() == []
        assert js.store.blobs.spool.files() == []  # type: ignore[attr-defined]
    finally:
        await g.stop(0)
        await js.stop(0)


async def test_transcript_of_unfinished_or_unknown_job(one_slot, long_clip):
    c, _, _ = one_slot
    job = await c.submit(audio.encode(long_clip.samples, "flac"))
    with pytest.raises(SttError) as err:
        await c.transcript(job.job_id)
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION and "COMPLETED" in err.value.message
    for call in (c.get_job("nope"), c.transcript("nope"), c.cancel_job("nope"), c.delete_job("nope")):
        with pytest.raises(SttError) as err:
            await call
        assert err.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(SttError) as err:
        await c.get_job("")
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    await c.wait(job.job_id)


async def test_high_priority_starts_before_earlier_low_jobs(one_slot, long_clip, short_clip):
    c, _, _ = one_slot
    busy = await c.submit(audio.encode(long_clip.samples, "flac"))
    while (await c.get_job(busy.job_id)).status != jobs_pb2.JOB_STATUS_RUNNING:
        await asyncio.sleep(0.05)
    data = audio.encode(short_clip.samples, "wav")
    lows = [await c.submit(data, priority="low") for _ in range(2)]
    high = await c.submit(data, priority="high")
    stats = await c.queue_stats()
    by = {p.priority: p for p in stats.priorities}
    assert (by[jobs_pb2.PRIORITY_LOW].pending, by[jobs_pb2.PRIORITY_HIGH].pending) == (2, 1)
    assert by[jobs_pb2.PRIORITY_NORMAL].running == 1 and stats.workers >= 1
    assert by[jobs_pb2.PRIORITY_LOW].oldest_wait_seconds > 0
    for j in [busy, *lows, high]:
        await c.wait(j.job_id)
    starts = {j.job_id: (await c.get_job(j.job_id)).start_time.ToDatetime() for j in [*lows, high]}
    assert starts[high.job_id] < min(starts[lo.job_id] for lo in lows)


def _outcomes(*names: str) -> dict[str, float]:
    """The dispatcher's runs so far, by outcome."""
    return {o: REGISTRY.get_sample_value("stt_dispatcher_jobs_total", {"outcome": o}) or 0.0 for o in names}


async def _until_idle(d: Dispatcher) -> None:
    """Until the dispatcher has no run (its outcome is counted), at most 30 s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while d.active:
        assert loop.time() < deadline, "the run never ended"
        await asyncio.sleep(0.05)


async def test_a_heartbeat_refused_because_the_job_just_completed_does_not_undo_the_run(
    tmp_path, transcriber, short_clip
):
    """The job's last write (CompleteJob) and a heartbeat race: the jobstore completes the job, then
    refuses the heartbeat (the lease ended with the job). The run still ends "completed", not
    cancelled half-way through reading CompleteJob's answer (seen as "stopped" under load)."""
    js, g = await _stack(transcriber, str(tmp_path), job_lease_seconds=3.0, job_heartbeat_seconds=0.1)
    try:
        d = g.dispatcher
        assert d is not None
        queue = d.queue
        real_complete, real_heartbeat = queue.complete_job, queue.heartbeat
        sent = asyncio.Event()  # CompleteJob is on its way
        refused = asyncio.Event()  # a heartbeat was refused after that

        async def heartbeat(lease):  # type: ignore[no-untyped-def]
            try:
                return await real_heartbeat(lease)
            except Exception:
                if sent.is_set():  # set once the dispatcher has seen the refusal
                    asyncio.get_running_loop().call_soon(refused.set)
                raise

        async def complete_job(lease, transcript, language):  # type: ignore[no-untyped-def]
            sent.set()
            await real_complete(lease, transcript, language)
            # The answer is "still on its way" until a heartbeat has been refused.
            await asyncio.wait_for(refused.wait(), 30)

        queue.heartbeat = heartbeat  # type: ignore[method-assign]
        queue.complete_job = complete_job  # type: ignore[method-assign]

        before = _outcomes("completed", "stopped", "error")
        async with AsyncClient(f"127.0.0.1:{g.port}") as c:
            job = await c.submit(audio.encode(short_clip.samples, "wav"))
            done = await c.wait(job.job_id)
        assert done.status == jobs_pb2.JOB_STATUS_COMPLETED
        await _until_idle(d)
        assert refused.is_set()
        after = _outcomes(*before)
        assert {o: after[o] - before[o] for o in after} == {"completed": 1, "stopped": 0, "error": 0}
    finally:
        await g.stop(0)
        await js.stop(0)


async def test_a_chunk_that_fails_the_job_ends_the_run_failed_not_stopped(tmp_path, transcriber, long_clip):
    """One chunk fails the job (INVALID_ARGUMENT from the model) while its siblings are still being
    transcribed: they come back after FailJob and record nothing, the lease is not renewed any more,
    and the run counts as "failed" (it was counted and traced "stopped": a sibling's CompleteChunk
    or the next heartbeat was refused because the job had ended)."""
    js, g = await _stack(transcriber, str(tmp_path), job_lease_seconds=3.0, job_heartbeat_seconds=0.1)
    try:
        d = g.dispatcher
        assert d is not None
        queue, real_transcribe, real_fail = d.queue, d.transcribe, d.queue.fail_job
        calls, written, second = 0, asyncio.Event(), asyncio.Event()

        async def transcribe(samples, options, work_class):  # type: ignore[no-untyped-def]
            nonlocal calls
            calls += 1
            if calls == 1:
                await asyncio.wait_for(second.wait(), 30)  # a sibling is being transcribed
                raise InvalidInput("this window cannot be transcribed", reason="BAD_CONFIG_VALUE")
            second.set()
            result = await real_transcribe(samples, options, work_class)
            await asyncio.wait_for(written.wait(), 30)  # comes back after the job has failed
            return result

        async def fail_job(lease, message, reason):  # type: ignore[no-untyped-def]
            await real_fail(lease, message, reason)
            for _ in range(5):  # heartbeats are due meanwhile (every 0.1 s)
                await asyncio.sleep(0.1)
            written.set()

        d.transcribe = transcribe  # type: ignore[method-assign]
        queue.fail_job = fail_job  # type: ignore[method-assign]

        before = _outcomes("failed", "stopped", "error")
        async with AsyncClient(f"127.0.0.1:{g.port}") as c:
            job = await c.submit(audio.encode(long_clip.samples, "flac"))
            done = await c.wait(job.job_id)
        assert done.status == jobs_pb2.JOB_STATUS_FAILED and "cannot be transcribed" in done.error_message
        await _until_idle(d)
        assert calls >= 2, "the job needs several chunks for this test"
        after = _outcomes(*before)
        assert {o: after[o] - before[o] for o in after} == {"failed": 1, "stopped": 0, "error": 0}
    finally:
        await g.stop(0)
        await js.stop(0)


async def test_cancel_running_job_frees_the_transcribers(one_slot, transcriber: Transcriber, long_clip):
    c, g, _ = one_slot
    job = await c.submit(audio.encode(np.tile(long_clip.samples, 3), "flac"))
    async for event in c.watch_job(job.job_id):
        if event.job.chunks_completed >= 1:
            break
    cancelled = await c.cancel_job(job.job_id)
    assert cancelled.status == jobs_pb2.JOB_STATUS_CANCELLED
    for _ in range(100):  # the dispatcher notices within a heartbeat; in-flight calls are cancelled
        if not g.dispatcher.active and transcriber.batcher.pending == 0 and transcriber.batcher.busy == 0:  # type: ignore[union-attr]
            break
        await asyncio.sleep(0.1)
    assert not g.dispatcher.active  # type: ignore[union-attr]
    assert transcriber.batcher.pending == 0 and transcriber.batcher.busy == 0
    final = await c.get_job(job.job_id)
    assert final.status == jobs_pb2.JOB_STATUS_CANCELLED and final.chunks_completed < final.chunks_total
    with pytest.raises(SttError) as err:
        await c.cancel_job(job.job_id)  # already cancelled: still fine
        await c.transcript(job.job_id)
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION


async def test_delete_removes_job_and_audio(one_slot, short_clip):
    c, _, js = one_slot
    job = await c.submit(audio.encode(short_clip.samples, "wav"), keep_audio=True)
    done = await c.wait(job.job_id)
    assert done.audio_retained and _blobs(js) == 1
    await c.delete_job(job.job_id)
    with pytest.raises(SttError) as err:
        await c.get_job(job.job_id)
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    assert _blobs(js) == 0


async def test_list_filters_and_pages(one_slot, short_clip):
    c, _, _ = one_slot
    data = audio.encode(short_clip.samples, "wav")
    ids = [(await c.submit(data)).job_id for _ in range(5)]
    for i in ids:
        await c.wait(i)
    seen, token = [], ""
    while True:
        page = await c.list_jobs(page_size=2, page_token=token)
        seen += [j.job_id for j in page.jobs]
        token = page.next_page_token
        if not token:
            break
    assert seen == list(reversed(ids))
    completed = await c.list_jobs(status="completed")
    assert len(completed.jobs) == 5
    assert not (await c.list_jobs(status="failed")).jobs


def _first_window_samples(data: bytes) -> int:
    from services.gateway.audio import Limits, decode
    from services.gateway.chunking import VadSettings, plan_windows, speech_regions

    decoded = decode(data, limits=Limits(10**8, 600)).samples
    w = plan_windows(decoded, speech_regions(decoded, VadSettings()))
    return w[0].end - w[0].start


async def test_a_chunk_that_keeps_failing_fails_its_job_only_and_retry_runs_it_again(
    transcriber, tmp_path, long_clip, short_clip
):
    """Failure injected in front of the real pool for one job's audio; other jobs carry on. Once
    the fault is gone, RetryJob runs the failed job again under its id and request id."""
    js, g = await _stack(transcriber, str(tmp_path), dispatch_concurrency=2)
    real = g.pool.transcribe
    bad_len = None

    async def flaky(samples, options, work_class):  # type: ignore[no-untyped-def]
        if bad_len is not None and samples.shape[0] == bad_len:
            raise Unavailable("injected model failure", reason="MODEL_ERROR")
        return await real(samples, options, work_class)

    g.dispatcher.transcribe = flaky  # type: ignore[union-attr]
    g.dispatcher.config.chunk_retry_seconds = 0.05  # type: ignore[union-attr]
    try:
        async with AsyncClient(f"127.0.0.1:{g.port}") as c:
            short = audio.encode(short_clip.samples, "wav")
            bad_len = _first_window_samples(short)
            bad = await c.submit(short, request_id="will-fail")
            good = await c.submit(audio.encode(long_clip.samples, "flac"))
            bad_done, good_done = await c.wait(bad.job_id), await c.wait(good.job_id)
            assert bad_done.status == jobs_pb2.JOB_STATUS_FAILED
            assert "chunk 0" in bad_done.error_message and "failed 3 times" in bad_done.error_message
            assert "injected model failure" in bad_done.error_message
            assert bad_done.failure_reason == "MODEL_ERROR" and bad_done.retry_count == 3
            assert bad_done.audio_retained
            assert good_done.status == jobs_pb2.JOB_STATUS_COMPLETED and good_done.retry_count == 0

            bad_len = None  # the fault is gone
            queued = await c.retry_job(bad.job_id)
            assert queued.job_id == bad.job_id and queued.status in (
                jobs_pb2.JOB_STATUS_QUEUED,
                jobs_pb2.JOB_STATUS_RUNNING,
            )
            assert queued.retry_count == 0 and not queued.failure_reason and not queued.error_message
            again = await c.retry_job(bad.job_id)  # idempotent while it is queued or running
            assert again.job_id == bad.job_id
            done = await c.wait(bad.job_id)
            assert done.status == jobs_pb2.JOB_STATUS_COMPLETED and done.retry_count == 0
            assert wer(short_clip.text, (await c.transcript(bad.job_id)).content) <= 0.15
            same = await c.submit(short, request_id="will-fail")  # the key still names this job
            assert same.job_id == bad.job_id and same.status == jobs_pb2.JOB_STATUS_COMPLETED
            with pytest.raises(SttError) as err:
                await c.retry_job(bad.job_id)
            assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
            assert err.value.reason == "JOB_NOT_RETRYABLE"
            with pytest.raises(SttError) as err:
                await c.retry_job("0" * 32)
            assert err.value.code == grpc.StatusCode.NOT_FOUND
    finally:
        await g.stop(0)
        await js.stop(0)


async def test_waiting_for_a_transcriber_is_not_charged(transcriber, tmp_path, short_clip):
    """No transcriber ready (as during a restart of every replica): the chunk waits and retries;
    the job completes with no attempt charged."""
    js, g = await _stack(transcriber, str(tmp_path), dispatch_concurrency=1)
    real = g.pool.transcribe
    refusals = 0

    async def none_ready(samples, options, work_class):  # type: ignore[no-untyped-def]
        nonlocal refusals
        if refusals < 6:
            refusals += 1
            raise Unavailable("no transcriber is ready (injected)", reason="NO_TRANSCRIBER")
        return await real(samples, options, work_class)

    g.dispatcher.transcribe = none_ready  # type: ignore[union-attr]
    g.dispatcher.config.capacity_retry_seconds = 0.01  # type: ignore[union-attr]
    try:
        async with AsyncClient(f"127.0.0.1:{g.port}") as c:
            job = await c.submit(audio.encode(short_clip.samples, "wav"))
            done = await c.wait(job.job_id)
        assert refusals == 6
        assert done.status == jobs_pb2.JOB_STATUS_COMPLETED and done.retry_count == 0
    finally:
        await g.stop(0)
        await js.stop(0)


async def test_cancelled_job_retried_and_audio_retained(one_slot, long_clip):
    c, _, js = one_slot
    job = await c.submit(audio.encode(long_clip.samples, "flac"), request_id="to-cancel")
    assert job.audio_retained
    async for event in c.watch_job(job.job_id):
        if event.job.chunks_completed >= 1:
            break
    cancelled = await c.cancel_job(job.job_id)
    assert cancelled.status == jobs_pb2.JOB_STATUS_CANCELLED and cancelled.audio_retained
    same = await c.submit(b"ignored", request_id="to-cancel")  # the key returns the job, whatever state
    assert same.job_id == job.job_id and same.status == jobs_pb2.JOB_STATUS_CANCELLED
    await c.retry_job(job.job_id)
    done = await c.wait(job.job_id)
    assert done.status == jobs_pb2.JOB_STATUS_COMPLETED and done.chunks_completed == done.chunks_total
    assert wer(long_clip.text, (await c.transcript(job.job_id)).content) <= 0.15
    # audio_retained says whether the audio is there, whoever removed it.
    stored = await js.store.get_job(job.job_id)
    await js.store.blobs.delete(stored.blob_key)
    gone = await c.get_job(job.job_id)
    assert not gone.audio_retained
    listed = [j for j in (await c.list_jobs()).jobs if j.job_id == job.job_id]
    assert listed and not listed[0].audio_retained


async def test_api_keys_and_tenants(transcriber, tmp_path, short_clip):
    js, g = await _stack(transcriber, str(tmp_path), api_keys="alice-key:alice,bob-key:bob")
    server = f"127.0.0.1:{g.port}"
    data = audio.encode(short_clip.samples, "wav")
    try:
        async with AsyncClient(server, api_key="") as anon:
            with pytest.raises(SttError) as err:
                await anon.recognize(data)
            assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
            assert (await anon.health())[""] == "SERVING"  # health stays open
        async with AsyncClient(server, api_key="wrong") as bad:
            with pytest.raises(SttError) as err:
                await bad.list_jobs()
            assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
        async with (
            AsyncClient(server, api_key="alice-key") as alice,
            AsyncClient(server, api_key="bob-key") as bob,
        ):
            job = await alice.submit(data, request_id="shared-id")
            other = await bob.submit(data, request_id="shared-id")  # keys are per tenant
            assert other.job_id != job.job_id
            with pytest.raises(SttError) as err:
                await bob.get_job(job.job_id)
            assert err.value.code == grpc.StatusCode.NOT_FOUND
            with pytest.raises(SttError) as err:
                await bob.cancel_job(job.job_id)
            assert err.value.code == grpc.StatusCode.NOT_FOUND
            assert [j.job_id for j in (await bob.list_jobs()).jobs] == [other.job_id]
            await alice.wait(job.job_id)
            assert (await alice.recognize(data)).transcript
    finally:
        await g.stop(0)
        await js.stop(0)


async def test_a_client_closing_its_watch_ends_the_call_cleanly(tmp_path, transcriber, short_clip):
    """A watcher that goes away while the gateway waits for the job's next event: the call ends as
    CANCELLED, not INTERNAL ("aclose(): asynchronous generator is already running")."""
    method = "/stt.v1.Jobs/WatchJob"

    def ended(code: str) -> float:
        return REGISTRY.get_sample_value("stt_rpc_total", {"method": method, "code": code}) or 0.0

    js, g = await _stack(transcriber, str(tmp_path), dispatch_concurrency=0)  # the job stays queued
    try:
        async with AsyncClient(f"127.0.0.1:{g.port}") as c:
            job = await c.submit(audio.encode(short_clip.samples, "wav"))
            before = {code: ended(code) for code in ("CANCELLED", "INTERNAL", "UNKNOWN")}
            call = c.jobs.WatchJob(jobs_pb2.WatchJobRequest(job_id=job.job_id))
            first = await call.read()
            assert first.job.status == jobs_pb2.JOB_STATUS_QUEUED
            call.cancel()  # the gateway is now waiting for the next event
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while all(ended(code) == n for code, n in before.items()):
                assert loop.time() < deadline, "the watch call never ended on the server"
                await asyncio.sleep(0.05)
        assert {code: ended(code) - n for code, n in before.items()} == {
            "CANCELLED": 1,
            "INTERNAL": 0,
            "UNKNOWN": 0,
        }
    finally:
        await g.stop(0)
        await js.stop(0)
