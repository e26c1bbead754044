"""Tracing in-process: the real gateway, transcriber and jobstore (conftest), spans kept in memory.

Each test switches tracing on for itself (services.shared.tracing.capture) and checks the shape of
what a trace backend would get: one trace per Recognize call, job and stream, linked across the
gRPC hops. tests/test_observability.py does the same across real processes and an OTLP receiver.
"""

from __future__ import annotations

import io
import json
import logging
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY

from services.shared import tracing
from services.shared.logging import JsonFormatter, _ContextFilter
from stt.client import AsyncClient
from stt.streaming import PcmAudio, pcm_chunks
from stt.v1 import jobs_pb2, speech_pb2, speech_pb2_grpc
from tests.support import audio
from tests.support.speech import by_name, load_16k
from tests.support.waiting import until

TRANSCRIBE = "stt.internal.v1.Transcriber/Transcribe"


@pytest.fixture
def spans() -> Iterator[list[Any]]:
    with tracing.capture() as captured:
        yield captured


def collected(spans: list[Any]) -> list[Any]:
    tracing.flush()
    return list(spans)


def named(spans: list[Any], name: str) -> list[Any]:
    return [s for s in spans if s.name == name]


def one(spans: list[Any], name: str) -> Any:
    hits = named(spans, name)
    assert len(hits) == 1, f"{name}: {len(hits)} spans among {sorted({s.name for s in spans})}"
    return hits[0]


def trace_of(spans: list[Any], root: Any) -> list[Any]:
    return [s for s in spans if s.context.trace_id == root.context.trace_id]


def parent_of(spans: list[Any], span: Any) -> Any:
    assert span.parent is not None, f"{span.name} has no parent"
    hits = [s for s in spans if s.context.span_id == span.parent.span_id]
    assert hits, f"the parent of {span.name} was not exported"
    return hits[0]


def _final_words_observed() -> float:
    return REGISTRY.get_sample_value("stt_stream_final_word_latency_seconds_count") or 0.0


def test_off_unless_asked() -> None:
    assert not tracing.enabled()
    assert not tracing.wanted(environ={})
    assert tracing.wanted(environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"})
    assert tracing.wanted(environ={"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4317"})
    assert tracing.wanted(environ={"STT_TRACING": "true"})
    assert tracing.wanted(True, environ={})
    assert not tracing.wanted(environ={"STT_TRACING": "true", "OTEL_SDK_DISABLED": "true"})
    assert not tracing.wanted(environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "x", "OTEL_TRACES_EXPORTER": "none"})
    # Off: nothing is added to outgoing metadata, no span, no ids in logs.
    md = (("x-request-id", "r"),)
    assert tracing.inject(md) is md
    assert tracing.traceparent() == ""
    assert tracing.log_ids() is None
    with tracing.span("x") as s:
        assert s is tracing.NO_SPAN


async def test_recognize_is_one_trace_through_gateway_transcriber_and_model(client: AsyncClient, spans):
    clip = by_name("librispeech_2412-153948-0000")
    resp = await client.recognize(audio.encode(load_16k(clip), "flac"), language="en")
    assert resp.transcript
    got = collected(spans)
    root = one(got, "stt.v1.Speech/Recognize")
    assert root.parent is None and root.kind.name == "SERVER"
    assert root.attributes["stt.audio_seconds"] == pytest.approx(clip.seconds, abs=0.1)
    assert root.attributes["rpc.grpc.status_code"] == 0
    trace = trace_of(got, root)
    clients = [s for s in named(trace, TRANSCRIBE) if s.kind.name == "CLIENT"]
    servers = [s for s in named(trace, TRANSCRIBE) if s.kind.name == "SERVER"]
    assert len(clients) == len(servers) == resp.metadata.window_count == 1
    assert parent_of(got, clients[0]) is root
    assert parent_of(got, servers[0]) is clients[0]  # the context crossed the gRPC hop
    model = one(trace, "transcriber.model")
    queue = one(trace, "transcriber.queue")
    for s in (model, queue):
        assert parent_of(got, s) is servers[0]
        assert s.attributes["stt.work_class"] == "INTERACTIVE"
        assert s.attributes["stt.batch_size"] >= 1
        assert s.attributes["stt.audio_seconds"] == pytest.approx(clip.seconds, abs=0.1)
    assert model.attributes["stt.model_seconds"] > 0
    assert queue.end_time <= model.start_time + 1_000_000  # the queue wait ends where the model call starts


async def test_a_callers_traceparent_is_continued(gateway, spans):
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        await speech_pb2_grpc.SpeechStub(channel).GetServerInfo(
            speech_pb2.GetServerInfoRequest(),
            metadata=(("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01"),),
            timeout=30,
        )
    server = one(collected(spans), "stt.v1.Speech/GetServerInfo")
    assert format(server.context.trace_id, "032x") == trace_id
    assert format(server.parent.span_id, "016x") == "00f067aa0ba902b7"


async def test_a_job_is_one_trace_from_creation_to_completion(client: AsyncClient, jobstore, spans):
    clip = by_name("harvard_osr_0030_8k")  # 47 s: more than one chunk
    job = await client.submit(audio.encode(load_16k(clip), "flac"), language="en")
    done = await client.wait(job.job_id)
    assert done.status == jobs_pb2.JOB_STATUS_COMPLETED and done.chunks_total >= 2
    # The job is COMPLETED once the store records it; the dispatcher's run span ends just after.
    await until(
        lambda: any(s.attributes.get("stt.job_id") == job.job_id for s in named(collected(spans), "job.run"))
    )
    got = collected(spans)
    create = one(got, "stt.v1.Jobs/CreateJob")
    trace = trace_of(got, create)
    names = defaultdict(int)
    for s in trace:
        names[s.name] += 1
    assert names["stt.internal.v1.JobStore/CreateJob"] == 1  # the jobstore's side of the upload
    assert names["job.queued"] == 1 and names["job.run"] == 1
    assert names["job.chunk"] == done.chunks_total
    assert names["transcriber.model"] == done.chunks_total
    assert names["stt.internal.v1.JobStore/CompleteJob"] == 2
    # The jobstore kept the context of its CreateJob span; the run continues it.
    stored = (await jobstore.store.get_job(job.job_id)).trace_parent
    store_create = next(
        s for s in named(trace, "stt.internal.v1.JobStore/CreateJob") if s.kind.name == "SERVER"
    )
    assert stored.startswith(f"00-{store_create.context.trace_id:032x}-{store_create.context.span_id:016x}-")
    run = one(trace, "job.run")
    assert parent_of(got, run) is store_create
    assert run.attributes["stt.job_id"] == job.job_id and run.attributes["stt.attempt"] == 1
    assert run.attributes["stt.outcome"] == "completed"
    queued = one(trace, "job.queued")
    assert queued.attributes["stt.queue_wait_seconds"] >= 0 and queued.end_time <= run.end_time
    for chunk in named(trace, "job.chunk"):
        assert parent_of(got, chunk) is run
        model = next(
            s
            for s in named(trace, "transcriber.model")
            if parent_of(got, parent_of(got, parent_of(got, s))) is chunk
        )
        assert model.attributes["stt.work_class"] == "BATCH"
        assert model.attributes["stt.audio_seconds"] == pytest.approx(
            chunk.attributes["stt.audio_seconds"], abs=0.01
        )
    # Heartbeats and the dispatcher's ClaimJob polls make no spans.
    assert not [s for s in got if s.name.endswith(("/Heartbeat", "/ClaimJob"))]


async def test_a_stream_is_one_trace_with_its_hypotheses_and_finals(client: AsyncClient, spans):
    clip = by_name("librispeech_2412-153948-0000")
    pcm = PcmAudio(audio.encode(load_16k(clip), "raw"), 16000, 1)
    before = _final_words_observed()
    finals = 0
    words = 0
    async for resp in client.stream(pcm_chunks(pcm), interim=True):
        for r in resp.results:
            if r.is_final:
                finals += 1
                words += len(r.transcript.split())
    assert finals >= 1
    got = collected(spans)
    root = one(got, "stt.v1.Speech/StreamingRecognize")
    trace = trace_of(got, root)
    hypotheses = named(trace, "stream.hypothesis")
    finals_traced = named(trace, "stream.final")
    assert len(hypotheses) >= 2 and len(finals_traced) == finals
    for h in hypotheses:
        assert parent_of(got, h) is root
    clients = [s for s in named(trace, TRANSCRIBE) if s.kind.name == "CLIENT"]
    assert {parent_of(got, c).name for c in clients} == {"stream.hypothesis"}
    assert {s.attributes["stt.work_class"] for s in named(trace, "transcriber.model")} == {"LIVE"}
    assert sum(s.attributes["stt.words"] for s in finals_traced) >= words
    # Every final word's latency was observed.
    assert _final_words_observed() - before >= words


def test_log_lines_carry_trace_and_span_ids(spans) -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(_ContextFilter())
    logger = logging.getLogger("test.tracing")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("outside")
        with tracing.span("work") as s:
            logger.warning("inside")
    finally:
        logger.removeHandler(handler)
    outside, inside = (json.loads(line) for line in out.getvalue().splitlines())
    assert "trace_id" not in outside
    ctx = s.get_span_context()
    assert inside["trace_id"] == f"{ctx.trace_id:032x}" and inside["span_id"] == f"{ctx.span_id:016x}"


async def test_the_http_door_traces_its_requests_too(gateway, spans):
    """POST /v1/audio/transcriptions with a caller's traceparent: the HTTP SERVER span continues it and
    the transcriber's spans are its children, as for gRPC."""
    import httpx

    clip = by_name("librispeech_2412-153948-0000")
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.http_port}", timeout=120) as http:
        resp = await http.post(
            "/v1/audio/transcriptions",
            files={"file": ("clip.flac", audio.encode(load_16k(clip), "flac"), "audio/flac")},
            data={"model": "whisper-1"},
            headers={"traceparent": f"00-{trace_id}-b7ad6b7169203331-01"},
        )
    assert resp.status_code == 200, resp.text
    got = collected(spans)
    root = one(got, "HTTP POST /v1/audio/transcriptions")
    assert format(root.context.trace_id, "032x") == trace_id
    assert root.attributes["http.response.status_code"] == 200
    trace = trace_of(got, root)
    client = next(s for s in named(trace, TRANSCRIBE) if s.kind.name == "CLIENT")
    assert parent_of(got, client) is root
    assert named(trace, "transcriber.model")


async def test_a_stream_the_client_cancels_mid_send_still_ends_completely(spans, caplog, monkeypatch) -> None:
    """A client that cancels a server stream while the server is sending to it (blocked on flow
    control): grpc drops the handler's generator where it stands, and the event loop's finaliser
    closes it later in a task of its own, another asyncio context than the call began in. Ending the
    call there must still do everything: one access log line, the call's cleanups, its SERVER span,
    and no "Task exception was never retrieved ... was created in a different Context". The access
    line carries the call's own request id, trace id and span id, also when the finaliser runs in a
    context where another request id and another span are current (the generators of two calls are
    let go of there; their lines had that request id and span)."""
    import asyncio
    import gc

    from services.shared import interceptors
    from services.shared.config import CommonSettings
    from services.shared.context import audit_var, call_cleanups_var, request_id_var
    from services.shared.server import Service, start_server

    caplog.set_level(logging.INFO)
    ids_filter = _ContextFilter()  # as the log handlers have: the ids the access line is written with
    caplog.handler.addFilter(ids_filter)
    cleaned: list[str] = []
    kept: list[Any] = []  # the generators of calls ended where the test lets go of them
    wrap_stream = interceptors._wrap_stream

    def keeping(*args: Any, **kwargs: Any) -> Any:
        wrapper = wrap_stream(*args, **kwargs)

        async def relay(request: Any, context: grpc.aio.ServicerContext) -> Any:
            calls = wrapper(request, context)
            if dict(context.invocation_metadata() or ()).get("x-request-id") in ("cancel-3", "cancel-4"):
                kept.append(calls)  # (closing the relay does not close it)
            async for item in calls:
                yield item

        return relay

    monkeypatch.setattr(interceptors, "_wrap_stream", keeping)

    class Cleanups(grpc.aio.ServerInterceptor):  # as the gateway's admission registers its release
        async def intercept_service(self, continuation, details):  # type: ignore[no-untyped-def]
            rid = dict(details.invocation_metadata or ()).get("x-request-id", "")
            call_cleanups_var.set([lambda: cleaned.append(rid)])
            return await continuation(details)

    async def flood(request: bytes, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
        for _ in range(1000):
            yield b"x" * 65536  # far more than the client's flow-control window

    handler = grpc.method_handlers_generic_handler(
        "test.Flood", {"Flood": grpc.unary_stream_rpc_method_handler(flood)}
    )
    server = await start_server(
        [Service("test.Flood", lambda s: s.add_generic_rpc_handlers((handler,)))],
        settings=CommonSettings(),
        host="127.0.0.1",
        port=0,
        interceptors=[Cleanups()],
    )
    calls = 5
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            method = channel.unary_stream("/test.Flood/Flood")
            for i in range(calls):
                call = method(b"", metadata=(("x-request-id", f"cancel-{i}"),))
                await call.read()
                await asyncio.sleep(0.2)  # the server is now blocked sending
                call.cancel()

        def ended() -> list[logging.LogRecord]:
            return [r for r in caplog.records if r.name == "access" and "/test.Flood/Flood" in r.getMessage()]

        await until(lambda: (gc.collect(), len(ended()) == calls - 2)[1], timeout=20, interval=0.1)
        assert len(kept) == 2
        elsewhere = request_id_var.set("not-this-call")
        try:
            with tracing.span("elsewhere"):
                kept.clear()  # their finaliser runs in this context
                gc.collect()
        finally:
            request_id_var.reset(elsewhere)
        await until(lambda: (gc.collect(), len(ended()) == calls)[1], timeout=20, interval=0.1)
        await until(lambda: len(cleaned) == calls, timeout=5)
        await asyncio.sleep(0.2)  # a failing finaliser task would be reported by now
        gc.collect()
    finally:
        caplog.handler.removeFilter(ids_filter)
        await server.stop(0)
    assert all("CANCELLED" in r.getMessage() for r in ended())
    assert sorted(cleaned) == [f"cancel-{i}" for i in range(calls)]
    assert sorted(getattr(r, "request_id", "") for r in ended()) == [f"cancel-{i}" for i in range(calls)]
    got = collected(spans)
    assert len(named(got, "test.Flood/Flood")) == calls
    own = {
        (f"{s.context.trace_id:032x}", f"{s.context.span_id:016x}") for s in named(got, "test.Flood/Flood")
    }
    assert {(getattr(r, "trace_id", ""), getattr(r, "span_id", "")) for r in ended()} == own
    assert request_id_var.get() == "" and audit_var.get() is None
    errors = [
        f"{r.name}: {r.getMessage()}" for r in caplog.records
        if "different Context" in (r.getMessage() + (r.exc_text or ""))
        or "never retrieved" in r.getMessage() or "Failed to detach" in r.getMessage()
        or "ending the call" in r.getMessage()
    ]  # fmt: skip
    assert not errors, errors
