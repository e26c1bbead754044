"""What the public contract promises, checked through real gRPC: request ids, GetServerInfo, error
details and field paths per RPC, ListJobs/WatchJob rules, RetryJob, and the SDK's blocking client."""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.gateway.server import Gateway
from services.jobstore.events import Notifier
from services.jobstore.server import JobstoreApp
from stt.client import AsyncClient, Client, recognition_config
from stt.errors import SttError
from stt.v1 import common_pb2, jobs_pb2, jobs_pb2_grpc, speech_pb2, speech_pb2_grpc
from tests.support import audio


def _details(exc: grpc.aio.AioRpcError) -> dict[str, object]:
    status = rpc_status.from_call(exc)
    assert status is not None
    out: dict[str, object] = {}
    for d in status.details:
        for cls in (
            error_details_pb2.ErrorInfo,
            error_details_pb2.RequestInfo,
            error_details_pb2.BadRequest,
            error_details_pb2.RetryInfo,
        ):
            if d.Is(cls.DESCRIPTOR):
                msg = cls()
                d.Unpack(msg)
                out[cls.__name__] = msg
    return out


async def test_request_id_is_echoed_in_headers_and_error_details(gateway: Gateway, short_clip):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as ch:
        speech = speech_pb2_grpc.SpeechStub(ch)
        call = speech.Recognize(
            speech_pb2.RecognizeRequest(content=audio.encode(short_clip.samples, "wav")),
            metadata=(("x-request-id", "client-chosen-42"),),
            timeout=60,
        )
        await call
        assert ("x-request-id", "client-chosen-42") in tuple(await call.initial_metadata())

        bad = speech.Recognize(
            speech_pb2.RecognizeRequest(content=b"not audio"),
            metadata=(("x-request-id", "bad-7"),),
            timeout=60,
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await bad
        details = _details(err.value)
        assert details["RequestInfo"].request_id == "bad-7"  # type: ignore[attr-defined]
        assert details["ErrorInfo"].domain == "stt.v1"  # type: ignore[attr-defined]
        assert ("x-request-id", "bad-7") in tuple(err.value.trailing_metadata())

        # No id, or one that is not printable ASCII: the server makes one and still echoes it.
        call = speech.GetServerInfo(
            speech_pb2.GetServerInfoRequest(), metadata=(("x-request-id", "a b"),), timeout=10
        )
        await call
        echoed = dict(await call.initial_metadata())["x-request-id"]
        assert echoed and echoed != "a b"


async def test_server_info_describes_model_limits_features_and_caller(client: AsyncClient, gateway: Gateway):
    info = await client.server_info()
    assert info.model.name == "tiny.en (bundled)" and not info.model.multilingual
    assert list(info.model.language_codes) == ["en"] and info.model.serving_replicas == 1
    limits = info.limits
    assert limits.max_recognize_bytes == gateway.speech.settings.max_recognize_bytes
    assert limits.max_recognize_seconds == gateway.speech.settings.max_recognize_seconds
    assert limits.max_beam_size == 20 and limits.max_page_size == 1000 and limits.default_page_size == 50
    assert limits.result_ttl_seconds > 0 and limits.max_job_attempts >= 1
    assert common_pb2.AUDIO_ENCODING_LINEAR16 in info.features.streaming_encodings
    assert common_pb2.AUDIO_ENCODING_MP4_AAC in info.features.recognize_encodings
    assert common_pb2.AUDIO_ENCODING_MP4_AAC not in info.features.streaming_encodings
    assert info.features.job_retry
    assert info.caller.tenant == "default"


@pytest.mark.parametrize(
    ("config", "field", "reason"),
    [
        (common_pb2.RecognitionConfig(encoding=99), "encoding", "UNSUPPORTED_ENCODING"),  # type: ignore[arg-type]
        (common_pb2.RecognitionConfig(language_code="x" * 8000), "language_code", "UNKNOWN_LANGUAGE"),
        (common_pb2.RecognitionConfig(language_code="de"), "language_code", "LANGUAGE_NOT_SUPPORTED"),
        (common_pb2.RecognitionConfig(beam_size=50), "beam_size", "BAD_CONFIG_VALUE"),
        (common_pb2.RecognitionConfig(temperature=math.nan), "temperature", "BAD_CONFIG_VALUE"),
        (common_pb2.RecognitionConfig(initial_prompt="p" * 5000), "initial_prompt", "BAD_CONFIG_VALUE"),
        (
            common_pb2.RecognitionConfig(encoding=common_pb2.AUDIO_ENCODING_LINEAR16),
            "sample_rate_hz",
            "MISSING_SAMPLE_RATE",
        ),
    ],
)
async def test_bad_config_names_its_field_in_every_rpc(
    client: AsyncClient, short_clip, config, field, reason
):
    """One validation for Recognize, StreamingRecognize and CreateJob, before any audio is read; the
    BadRequest field path is the one of each RPC's request, and messages stay short."""
    wav = audio.encode(short_clip.samples, "wav")
    with pytest.raises(SttError) as err:
        await client.recognize(wav, config=config)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and err.value.reason == reason
    assert list(err.value.fields) == [f"config.{field}"] and len(err.value.message) < 400

    with pytest.raises(SttError) as err:
        await client.submit(wav, config=config)
    assert err.value.reason == reason and list(err.value.fields) == [f"metadata.config.{field}"]

    stream_config = common_pb2.RecognitionConfig()
    stream_config.CopyFrom(config)
    if not stream_config.encoding:
        stream_config.encoding = common_pb2.AUDIO_ENCODING_LINEAR16
        stream_config.sample_rate_hz = 16000
    with pytest.raises(SttError) as err:
        async for _ in client.stream([b"\0\0" * 1600], config=stream_config):
            pass
    assert err.value.reason == reason
    assert list(err.value.fields) == [f"streaming_config.config.{field}"]


async def test_decode_errors_name_the_upload_field(client: AsyncClient):
    with pytest.raises(SttError) as err:
        await client.recognize(b"RIFF....not really audio")
    assert err.value.reason == "UNDECODABLE_AUDIO" and list(err.value.fields) == ["content"]
    with pytest.raises(SttError) as err:
        await client.submit(b"RIFF....not really audio")
    assert err.value.reason == "UNDECODABLE_AUDIO" and list(err.value.fields) == ["audio_chunk"]


async def test_list_jobs_refuses_unknown_status_and_negative_page_size(client: AsyncClient):
    with pytest.raises(SttError) as err:
        await client.list_jobs(status=42)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and list(err.value.fields) == ["status"]
    with pytest.raises(SttError) as err:
        await client.list_jobs(page_size=-1)
    assert list(err.value.fields) == ["page_size"]


async def test_watch_job_sends_only_visible_changes(client: AsyncClient, long_clip):
    job = await client.submit(audio.encode(long_clip.samples, "flac"))
    events = [e async for e in client.watch_job(job.job_id)]
    seen = []
    for e in events:
        key = (
            e.job.status,
            e.job.chunks_completed,
            e.job.chunks_total,
            e.job.retry_count,
            e.partial_transcript,
        )
        assert key not in seen, f"an event that differs only in what a client cannot see: {key}"
        seen.append(key)
    assert events[-1].job.status == jobs_pb2.JOB_STATUS_COMPLETED
    assert not events[-1].job.HasField("update_time") or events[-1].job.update_time.seconds > 0


async def test_retry_job_requeues_a_cancelled_job_under_its_id(client: AsyncClient, short_clip):
    job = await client.submit(audio.encode(short_clip.samples, "wav"), request_id="retry-me", priority="low")
    cancelled = await client.cancel_job(job.job_id)
    if cancelled.status == jobs_pb2.JOB_STATUS_COMPLETED:
        pytest.skip("the job finished before it could be cancelled")
    with pytest.raises(SttError) as err:
        await client.transcript(job.job_id)
    assert err.value.reason == "JOB_NOT_COMPLETED"
    again = await client.retry_job(job.job_id)
    assert again.job_id == job.job_id and again.retry_count == 0
    # QUEUED, or already RUNNING if a dispatcher took it at once.
    assert again.status in (jobs_pb2.JOB_STATUS_QUEUED, jobs_pb2.JOB_STATUS_RUNNING)
    done = await client.wait(job.job_id)
    assert done.status == jobs_pb2.JOB_STATUS_COMPLETED
    with pytest.raises(SttError) as err:
        await client.retry_job(job.job_id)
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION and err.value.reason == "JOB_NOT_RETRYABLE"
    # The same request_id still names the same job.
    same = await client.submit(audio.encode(short_clip.samples, "wav"), request_id="retry-me")
    assert same.job_id == job.job_id


async def test_watchers_of_finished_or_unknown_jobs_leave_nothing_behind(
    client: AsyncClient, jobstore: JobstoreApp, short_clip
):
    job = await client.submit(audio.encode(short_clip.samples, "wav"))
    await client.wait(job.job_id)
    before = jobstore.store.bus.waiting_keys
    for _ in range(20):
        assert [e.job.status async for e in client.watch_job(job.job_id)] == [jobs_pb2.JOB_STATUS_COMPLETED]
        with pytest.raises(SttError):
            async for _ in client.watch_job("0" * 32):
                pass
    assert jobstore.store.bus.waiting_keys <= before


async def test_notifier_releases_keys_nobody_waits_for():
    n = Notifier()
    a, b = n.future("job"), n.future("job")
    assert a is b and len(n) == 1
    n.release("job", a)
    assert len(n) == 1  # one waiter left
    n.release("job", b)
    assert len(n) == 0 and a.cancelled()
    c = n.future("job")
    n.notify("job")
    assert c.done() and len(n) == 0
    n.release("job", c)  # after a notice: nothing to do
    assert len(n) == 0


async def test_blocking_client_is_the_async_client(gateway: Gateway, short_clip):
    # The servers run on this test's event loop: the blocking client runs in a thread.
    await asyncio.to_thread(_blocking_client_calls, f"127.0.0.1:{gateway.port}", short_clip)


def _blocking_client_calls(server: str, short_clip: audio.Clip) -> None:
    with Client(server, timeout=120) as c:
        resp = c.recognize(audio.encode(short_clip.samples, "wav"), language="en")
        assert resp.transcript and resp.metadata.model == "tiny.en (bundled)" and resp.metadata.request_id
        job = c.submit(audio.encode(short_clip.samples, "wav"))
        statuses = [e.job.status for e in c.watch_job(job.job_id)]
        assert statuses[-1] == jobs_pb2.JOB_STATUS_COMPLETED
        assert c.transcript(job.job_id, "srt").content.startswith("1\n")
        assert c.health()[""] == "SERVING"
        with pytest.raises(SttError) as err:
            c.get_job("nope")
        assert err.value.code == grpc.StatusCode.NOT_FOUND and err.value.request_id


def test_sdk_accepts_enum_names_in_any_form():
    assert recognition_config(encoding="linear16").encoding == common_pb2.AUDIO_ENCODING_LINEAR16
    assert recognition_config(encoding="AUDIO_ENCODING_FLAC").encoding == common_pb2.AUDIO_ENCODING_FLAC
    with pytest.raises(ValueError, match="encoding must be one of"):
        recognition_config(encoding="aiff")


async def test_cli_options_before_or_after_the_command(gateway: Gateway, short_clip, tmp_path):
    wav = tmp_path / "clip.wav"
    wav.write_bytes(audio.encode(short_clip.samples, "wav"))
    server = f"127.0.0.1:{gateway.port}"
    for argv in (
        ["--server", server, "transcribe", str(wav)],
        ["transcribe", str(wav), "--server", server, "--timeout", "60"],
    ):
        out = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "stt.cli", *argv], capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        assert "weather" in out.stdout.lower()
    out = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "stt.cli", "jobs", "get", "nope", "-s", server],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "NOT_FOUND" in out.stderr and "Traceback" not in out.stderr
    assert "request id:" in out.stderr


async def test_jobs_stub_sees_retry_job(gateway: Gateway):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await jobs_pb2_grpc.JobsStub(ch).RetryJob(jobs_pb2.RetryJobRequest(job_id="0" * 32), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
