"""The HTTP front door through real clients: the official `openai` package for the OpenAI-compatible
endpoints, plain HTTP (httpx) for jobs over REST, the docs and the page, against the in-process
gateway (gRPC and HTTP on one event loop) with a real transcriber and jobstore."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from services.gateway.server import Gateway
from services.gateway.server import create_server as create_gateway
from stt.client import AsyncClient
from tests.conftest import gateway_settings, wait_serving
from tests.support import audio
from tests.support.speech import RealClip, by_name, load_16k
from tests.support.text import normalize, wer
from tests.support.waiting import until

KEY = "sk-test-acme"
JFK = by_name("jfk_inaugural_16k")
HARVARD = by_name("harvard_osr_0010_8k")


def upload(clip: RealClip) -> tuple[str, bytes]:
    return clip.path.name, clip.path.read_bytes()


def base_url(gw: Gateway) -> str:
    return f"http://127.0.0.1:{gw.http_port}"


@pytest.fixture(scope="module")
async def locked(transcriber, jobstore) -> AsyncIterator[Gateway]:  # type: ignore[no-untyped-def]
    """A second gateway with API keys and small Recognize limits (for the error cases)."""
    gw = await create_gateway(
        gateway_settings(
            f"127.0.0.1:{transcriber.port}",
            jobstore_address=f"127.0.0.1:{jobstore.port}",
            api_keys=f"{KEY}:acme",
            max_recognize_bytes=256 * 1024,
            max_recognize_seconds=8.0,
            dispatch_concurrency=0,
        ),
        port=0,
    )
    await wait_serving(gw)
    yield gw
    await gw.stop(0)


@pytest.fixture(scope="module")
def oai(gateway: Gateway) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=base_url(gateway) + "/v1", api_key="unused", max_retries=0, timeout=120
    )


@pytest.fixture(scope="module")
async def http(gateway: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=base_url(gateway), timeout=120) as c:
        yield c


# -- OpenAI-compatible: /v1/audio/transcriptions and /v1/models ----------------------------------------


async def test_models_lists_the_loaded_model_and_the_whisper_alias(oai: openai.AsyncOpenAI, gateway: Gateway):
    ids = [m.id async for m in oai.models.list()]
    caps = gateway.pool.caps()
    assert caps is not None
    assert ids == [caps.name, "whisper-1"]
    assert (await oai.models.retrieve("whisper-1")).id == "whisper-1"
    with pytest.raises(openai.NotFoundError):
        await oai.models.retrieve("gpt-9")


async def test_json_and_text_formats(oai: openai.AsyncOpenAI):
    result = await oai.audio.transcriptions.create(model="whisper-1", file=upload(JFK))
    assert wer(JFK.text, result.text) <= 0.15, result.text
    assert result.usage is not None and result.usage.seconds == 11  # type: ignore[union-attr]
    text = await oai.audio.transcriptions.create(model="whisper-1", file=upload(JFK), response_format="text")
    assert isinstance(text, str) and text.strip() == result.text


async def test_subtitle_formats(oai: openai.AsyncOpenAI):
    srt = await oai.audio.transcriptions.create(model="whisper-1", file=upload(JFK), response_format="srt")
    vtt = await oai.audio.transcriptions.create(model="whisper-1", file=upload(JFK), response_format="vtt")
    cues = [c.split("\n") for c in srt.strip().split("\n\n")]
    assert [c[0] for c in cues] == [str(i) for i in range(1, len(cues) + 1)]
    times = [re.fullmatch(r"(\d\d:\d\d:\d\d,\d\d\d) --> (\d\d:\d\d:\d\d,\d\d\d)", c[1]) for c in cues]
    assert all(times), srt
    assert wer(JFK.text, " ".join(" ".join(c[2:]) for c in cues)) <= 0.15
    assert vtt.startswith("WEBVTT\n\n")
    assert vtt.count(" --> ") == len(cues)
    assert srt.replace(",", ".").split("\n")[1] in vtt  # the same first cue


async def test_verbose_json_with_words_and_segments(oai: openai.AsyncOpenAI):
    result = await oai.audio.transcriptions.create(
        model="whisper-1",
        file=upload(JFK),
        response_format="verbose_json",
        timestamp_granularities=["word", "segment"],
        language="en",
    )
    assert result.language == "english"
    assert result.duration == pytest.approx(JFK.seconds, abs=0.1)
    assert result.segments and result.words
    assert wer(JFK.text, " ".join(s.text for s in result.segments)) <= 0.15
    assert wer(JFK.text, " ".join(w.word for w in result.words)) <= 0.15
    starts = [w.start for w in result.words]
    assert starts == sorted(starts)
    assert all(0 <= w.start <= w.end <= JFK.seconds + 0.05 and w.word == w.word.strip() for w in result.words)
    for seg in result.segments:  # each segment's words lie inside it
        inside = [w for w in result.words if seg.start - 0.05 <= w.start < seg.end]
        assert wer(seg.text, " ".join(w.word for w in inside)) <= 0.34, (seg.text, inside)
    only_words = await oai.audio.transcriptions.create(
        model="whisper-1", file=upload(JFK), response_format="verbose_json", timestamp_granularities=["word"]
    )
    assert only_words.words and not only_words.segments
    default = await oai.audio.transcriptions.create(
        model="whisper-1", file=upload(JFK), response_format="verbose_json"
    )
    assert default.segments and not default.words


async def test_stream_true_sends_deltas_then_done(oai: openai.AsyncOpenAI):
    stream = await oai.audio.transcriptions.create(model="whisper-1", file=upload(HARVARD), stream=True)
    events = [event async for event in stream]
    kinds = [e.type for e in events]
    assert kinds[-1] == "transcript.text.done" and set(kinds[:-1]) == {"transcript.text.delta"}
    assert len(kinds) > 3  # one delta per segment of a 34 s recording
    joined = "".join(e.delta for e in events[:-1])  # type: ignore[union-attr]
    assert joined == events[-1].text  # type: ignore[union-attr]
    assert wer(HARVARD.text, joined) <= 0.2, joined


async def test_prompt_and_language_reach_the_model(oai: openai.AsyncOpenAI):
    result = await oai.audio.transcriptions.create(
        model="whisper-1",
        file=upload(by_name("ami_ES2011a_headset0_40-46s")),
        language="en",
        prompt="Abigail Claflin, Abbie.",
        temperature=0,
    )
    assert "claflin" in normalize(result.text) or "abbie" in normalize(result.text), result.text


async def test_errors_in_the_shape_the_openai_client_raises(locked: Gateway):
    oai = openai.AsyncOpenAI(base_url=base_url(locked) + "/v1", api_key=KEY, max_retries=0, timeout=60)
    # Not audio.
    with pytest.raises(openai.BadRequestError) as bad:
        await oai.audio.transcriptions.create(
            model="whisper-1", file=("notes.wav", b"this is not audio" * 50)
        )
    assert bad.value.code == "undecodable_audio" and bad.value.param == "file"
    assert bad.value.type == "invalid_request_error" and bad.value.request_id
    # A valid file over the duration limit (8 s here).
    long = audio.encode(audio.conversation(audio.SENTENCES[:3], pause=1.0).samples, "ogg")
    with pytest.raises(openai.BadRequestError) as too_long:
        await oai.audio.transcriptions.create(model="whisper-1", file=("long.ogg", long))
    assert too_long.value.code == "audio_too_long" and "limit is 8" in too_long.value.message
    # Over the byte limit (256 KiB here): 413, refused while receiving.
    with pytest.raises(openai.APIStatusError) as too_big:
        await oai.audio.transcriptions.create(model="whisper-1", file=("big.wav", b"\0" * (2 * 1024 * 1024)))
    assert too_big.value.status_code == 413 and too_big.value.code == "audio_too_large"
    # A language the English-only model cannot do: the field is named as the form field.
    with pytest.raises(openai.BadRequestError) as lang:
        await oai.audio.transcriptions.create(model="whisper-1", file=upload(JFK), language="de")
    assert lang.value.code == "language_not_supported" and lang.value.param == "language"
    # Unknown model.
    with pytest.raises(openai.NotFoundError):
        await oai.audio.transcriptions.create(model="whisper-9", file=upload(JFK))
    # stream=true with a subtitle format.
    with pytest.raises(openai.BadRequestError) as streamed:
        await oai.audio.transcriptions.create(
            model="whisper-1", file=upload(JFK), response_format="srt", stream=True
        )  # type: ignore[call-overload]
    assert streamed.value.param == "stream"
    # A bad key, and none.
    for key in ("sk-wrong", ""):
        other = openai.AsyncOpenAI(base_url=base_url(locked) + "/v1", api_key=key or "x", max_retries=0)
        if not key:
            other = other.with_options(default_headers={"Authorization": ""})
        with pytest.raises(openai.AuthenticationError) as denied:
            await other.models.list()
        assert denied.value.code == "unauthenticated" and denied.value.status_code == 401
    # The right key works, and the caller's tenant reaches the API layer (GetServerInfo over HTTP).
    assert [m.id async for m in oai.models.list()]
    async with httpx.AsyncClient(base_url=base_url(locked), headers={"x-api-key": KEY}) as c:
        info = (await c.get("/v1/info")).json()
    assert info["caller"]["tenant"] == "acme" and info["limits"]["max_recognize_seconds"] == 8.0


async def test_http_and_grpc_give_the_same_transcript(oai: openai.AsyncOpenAI, client: AsyncClient):
    data = JFK.path.read_bytes()
    over_grpc = await client.recognize(data, word_timestamps=True)
    over_http = await oai.audio.transcriptions.create(
        model="whisper-1",
        file=("jfk.flac", data),
        response_format="verbose_json",
        timestamp_granularities=["word"],
    )
    assert over_http.text == over_grpc.transcript
    assert [w.word for w in over_http.words or []] == [
        w.word.strip() for r in over_grpc.results for w in r.words
    ]


# -- jobs over REST ----------------------------------------------------------------------------------------


async def _sse(resp: httpx.Response) -> AsyncIterator[tuple[str, dict]]:
    event = "message"
    async for line in resp.aiter_lines():
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            yield event, json.loads(line[6:])
            event = "message"


async def test_job_lifecycle_over_rest(http: httpx.AsyncClient):
    data = HARVARD.path.read_bytes()
    form = {"priority": "high", "request_id": "rest-harvard-1", "language": "en", "word_timestamps": "true"}
    created = await http.post("/v1/jobs", files={"file": ("harvard.flac", data)}, data=form)
    assert created.status_code == 200, created.text
    job = created.json()
    assert job["status"] in ("queued", "running") and job["priority"] == "high"
    assert job["filename"] == "harvard.flac" and job["size_bytes"] == len(data)
    again = await http.post("/v1/jobs", files={"file": ("harvard.flac", data)}, data=form)
    assert again.json()["job_id"] == job["job_id"]  # same request_id: the same job
    # Progress as server-sent events until the job is done.
    seen = []
    async with http.stream("GET", f"/v1/jobs/{job['job_id']}/events") as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        async for kind, event in _sse(resp):
            assert kind == "job"
            seen.append(
                (event["job"]["status"], event["job"]["chunks_completed"], event["job"]["chunks_total"])
            )
    assert seen[-1][0] == "completed" and seen[-1][1] == seen[-1][2] >= 2
    done = [c for _, c, _ in seen]
    assert done == sorted(done)
    text = (await http.get(f"/v1/jobs/{job['job_id']}/transcript")).text
    assert wer(HARVARD.text, text) <= 0.2, text
    for fmt, ctype, check in [
        ("json", "application/json", lambda body: json.loads(body)["segments"][0]["words"]),
        ("srt", "application/x-subrip", lambda body: body.startswith("1\n00:00:")),
        ("vtt", "text/vtt", lambda body: body.startswith("WEBVTT")),
    ]:
        resp = await http.get(f"/v1/jobs/{job['job_id']}/transcript", params={"format": fmt})
        assert resp.status_code == 200 and resp.headers["content-type"].startswith(ctype)
        assert check(resp.text), resp.text[:200]
    got = (await http.get(f"/v1/jobs/{job['job_id']}")).json()
    assert got["status"] == "completed" and got["complete_time"] and got["audio_duration_seconds"] > 33
    listed = (await http.get("/v1/jobs", params={"status": "completed", "page_size": 50})).json()
    assert job["job_id"] in [j["job_id"] for j in listed["jobs"]]
    # Wrong state, unknown ids and bad input come back as OpenAI-shaped errors.
    cancel = await http.post(f"/v1/jobs/{job['job_id']}/cancel")
    assert cancel.status_code == 409 and cancel.json()["error"]["code"] == "job_finished"
    assert (await http.get("/v1/jobs", params={"status": "sleeping"})).json()["error"]["param"] == "status"
    assert (await http.delete(f"/v1/jobs/{job['job_id']}")).status_code == 204
    missing = await http.get(f"/v1/jobs/{job['job_id']}")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "job_not_found"


async def test_job_from_a_raw_body_and_bad_uploads(http: httpx.AsyncClient):
    data = audio.encode(load_16k(JFK), "mp3")
    created = await http.post(
        "/v1/jobs", content=data, params={"filename": "jfk.mp3", "priority": "low"},
        headers={"content-type": "audio/mpeg", "idempotency-key": "raw-jfk-1"},
    )  # fmt: skip
    assert created.status_code == 200, created.text
    job = created.json()
    assert job["priority"] == "low" and job["request_id"] == "raw-jfk-1" and job["filename"] == "jfk.mp3"
    async with http.stream("GET", f"/v1/jobs/{job['job_id']}/events") as resp:
        last = [event async for _, event in _sse(resp)][-1]
    assert last["job"]["status"] == "completed"
    text = (await http.get(f"/v1/jobs/{job['job_id']}/transcript")).text
    assert wer(JFK.text, text) <= 0.2
    bad = await http.post("/v1/jobs", files={"file": ("x.wav", b"not audio" * 100)})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "file"
    bad_priority = await http.post(
        "/v1/jobs", files={"file": ("a.flac", JFK.path.read_bytes())}, data={"priority": "urgent"}
    )
    assert bad_priority.status_code == 400 and bad_priority.json()["error"]["param"] == "priority"
    no_file = await http.post("/v1/jobs", files={"other": ("a.flac", b"x")})
    assert no_file.status_code == 400 and no_file.json()["error"]["param"] == "file"
    # Numbers past the proto fields' range are the caller's mistake (400), not a server error.
    huge_beam = await http.post(
        "/v1/jobs", files={"file": ("a.flac", JFK.path.read_bytes())}, data={"beam_size": "99999999999"}
    )
    assert huge_beam.status_code == 400 and huge_beam.json()["error"]["param"] == "beam_size", huge_beam.text
    huge_page = await http.get("/v1/jobs", params={"page_size": 99999999999})
    assert huge_page.status_code == 400 and huge_page.json()["error"]["param"] == "page_size", huge_page.text
    stats = (await http.get("/v1/queue")).json()
    assert {p["priority"] for p in stats["priorities"]} >= {"high", "normal", "low"}
    assert (await http.get("/v1/jobs/nope/events")).status_code == 404


async def test_jobs_need_the_key_and_tenants_do_not_see_each_other(locked: Gateway, gateway: Gateway):
    async with httpx.AsyncClient(base_url=base_url(locked), timeout=60) as c:
        denied = await c.get("/v1/jobs")
        assert denied.status_code == 401 and denied.json()["error"]["code"] == "unauthenticated"
        assert denied.headers["www-authenticate"] == "Bearer"
        created = await c.post(
            "/v1/jobs",
            files={"file": ("jfk.flac", JFK.path.read_bytes())},
            headers={"authorization": f"Bearer {KEY}"},
        )
        assert created.status_code == 200, created.text
        job_id = created.json()["job_id"]
    # The same jobstore, another tenant ("default" on the open gateway): not found.
    async with httpx.AsyncClient(base_url=base_url(gateway)) as c:
        assert (await c.get(f"/v1/jobs/{job_id}")).status_code == 404


# -- docs, page, request ids -------------------------------------------------------------------------------


async def test_openapi_and_docs_are_served_locally(http: httpx.AsyncClient):
    spec = (await http.get("/openapi.json")).json()
    assert {"/v1/audio/transcriptions", "/v1/models", "/v1/jobs", "/v1/jobs/{job_id}/events",
            "/v1/jobs/{job_id}/transcript"} <= set(spec["paths"])  # fmt: skip
    job = spec["components"]["schemas"]["Job"]["properties"]
    assert job["status"]["enum"] == ["unspecified", "queued", "running", "completed", "failed", "cancelled"]
    docs = await http.get("/docs")
    assert docs.status_code == 200
    urls = re.findall(r"""(?:src|href)=["']([^"']+)["']""", docs.text)
    assert urls and all(u.startswith("/") for u in urls), urls  # nothing from another host
    for url in urls:
        assert (await http.get(url)).status_code == 200, url


async def test_page_and_its_assets_are_self_contained(http: httpx.AsyncClient):
    page = await http.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    static = Path(__file__).parents[1] / "services/gateway/http/static"
    for name in ("index.html", "app.js", "app.css"):
        body = (static / name).read_text()
        assert not re.search(r"https?://", body), f"{name} refers to another host"
    for url in re.findall(r"""(?:src|href)=["'](/[^"']+)["']""", page.text):
        assert (await http.get(url)).status_code == 200, url


async def test_request_ids_are_echoed(http: httpx.AsyncClient, locked: Gateway):
    resp = await http.get("/v1/models", headers={"x-request-id": "trace-42"})
    assert resp.headers["x-request-id"] == "trace-42"
    assert len((await http.get("/v1/models")).headers["x-request-id"]) == 16
    # Exactly once, on successes and on every kind of error (an error's own headers carry it too).
    sent = {"x-request-id": "trace-43"}
    async with httpx.AsyncClient(base_url=base_url(locked)) as keyed:
        responses = [
            (200, await http.get("/v1/models", headers=sent)),
            (
                400,
                await http.post("/v1/audio/transcriptions", files={"file": ("zero.wav", b"")}, headers=sent),
            ),
            (400, await http.post("/v1/audio/transcriptions", headers=sent)),  # no file at all
            (404, await http.get("/v1/no-such-path", headers=sent)),
            (404, await http.get("/v1/jobs/nope", headers=sent)),
            (401, await keyed.get("/v1/jobs", headers=sent)),
        ]
    for status, resp in responses:
        assert resp.status_code == status, resp.text
        assert resp.headers.get_list("x-request-id") == ["trace-43"], (status, resp.headers.raw)


async def test_a_client_leaving_a_job_event_stream_ends_it_cleanly(transcriber, jobstore, tmp_path, caplog):
    """A browser that closes /v1/jobs/{id}/events while the gateway waits for the job's next event:
    the stream ends without "unhandled error" / "Exception in ASGI application" (the event stream was
    closed while its pending read still ran)."""
    import asyncio
    import logging

    caplog.set_level(logging.INFO, logger="access")
    gw = await create_gateway(
        gateway_settings(
            f"127.0.0.1:{transcriber.port}", jobstore_address=f"127.0.0.1:{jobstore.port}",
            dispatch_concurrency=0, spool_dir=str(tmp_path),
        ),
        port=0,
    )  # fmt: skip
    try:
        await wait_serving(gw)
        async with httpx.AsyncClient(base_url=base_url(gw), timeout=60) as h:
            created = await h.post(
                "/v1/jobs", files={"file": ("a.wav", audio.encode(audio.silence(2), "wav"))}
            )
            path = f"/v1/jobs/{created.json()['job_id']}/events"
            for _ in range(3):
                async with h.stream("GET", path) as resp:
                    async for line in resp.aiter_lines():
                        if line.startswith("data"):
                            break  # the job as it is (queued: this gateway runs no jobs); then leave

        def ended() -> int:
            return sum(1 for r in caplog.records if r.name == "access" and f"GET {path}" in r.getMessage())

        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while ended() < 3:
            assert loop.time() < deadline, "the event streams never ended on the server"
            await asyncio.sleep(0.05)
        assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    finally:
        await gw.stop(0)


# -- slow and vanishing clients ---------------------------------------------------------------------------


@pytest.fixture
async def spooled(transcriber, jobstore, tmp_path) -> AsyncIterator[Gateway]:  # type: ignore[no-untyped-def]
    """A gateway of its own whose uploads spool under tmp_path (to see what they leave)."""
    gw = await create_gateway(
        gateway_settings(
            f"127.0.0.1:{transcriber.port}", jobstore_address=f"127.0.0.1:{jobstore.port}",
            dispatch_concurrency=0, spool_dir=str(tmp_path),
        ),
        port=0,
    )  # fmt: skip
    await wait_serving(gw)
    yield gw
    await gw.stop(0)


async def _raw_request(gw: Gateway, head: bytes, body: bytes = b"") -> tuple[Any, Any]:
    import asyncio

    reader, writer = await asyncio.open_connection("127.0.0.1", gw.http_port)
    writer.write(head + body)
    await writer.drain()
    return reader, writer


def _post(path: str, length: int, ctype: str = "application/octet-stream") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nhost: test\r\ncontent-type: {ctype}\r\ncontent-length: {length}\r\n"
        "x-request-id: slow-1\r\n\r\n"
    ).encode()


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR]


def _access(caplog: pytest.LogCaptureFixture, path: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "access" and path in r.getMessage()]


async def test_an_upload_that_stalls_is_refused_408_and_leaves_nothing(spooled: Gateway, caplog, monkeypatch):
    """A body that stops arriving (here 1 s without a byte): 408 STREAM_IDLE from the front door,
    the connection closed, the partial upload gone from the spool; a steady slow body is not
    refused (each read has the time, not the whole body)."""
    import asyncio

    from services.gateway.http import middleware

    monkeypatch.setattr(middleware, "BODY_IDLE_SECONDS", 1.0, raising=False)
    caplog.set_level(logging.INFO)
    for path, ctype in (
        ("/v1/jobs", "audio/wav"),
        ("/v1/audio/transcriptions", "multipart/form-data; boundary=b"),
    ):
        part = b'--b\r\ncontent-disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
        reader, writer = await _raw_request(spooled, _post(path, 200_000, ctype), part + bytes(50_000))
        await asyncio.sleep(0.3)
        if path == "/v1/jobs":
            assert spooled.jobs.spool.files(), "the upload is being spooled"
        response = await asyncio.wait_for(reader.read(), 10)  # to EOF: the server closes
        writer.close()
        head, _, body = response.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 "), response[:300]
        assert b"connection: close" in head.lower() and head.lower().count(b"x-request-id: slow-1") == 1
        error = json.loads(body)["error"]
        assert (
            error["code"] == "stream_idle"
            and "no bytes of the request body arrived for 1s" in error["message"]
        )
        assert spooled.jobs.spool.files() == []
        assert any(" 408 " in line for line in _access(caplog, path)), _access(caplog, path)
    # Slow but steady: a piece every 0.5 s is never idle for 1 s.
    data = audio.encode(audio.silence(1), "wav")
    reader, writer = await _raw_request(spooled, _post("/v1/jobs", len(data), "audio/wav"))
    for i in range(0, len(data), len(data) // 4 + 1):
        await asyncio.sleep(0.5)
        writer.write(data[i : i + len(data) // 4 + 1])
    response = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    writer.close()
    assert response.startswith(b"HTTP/1.1 200 "), response
    assert not _errors(caplog), _errors(caplog)


async def test_a_client_that_leaves_mid_upload_is_a_499_not_a_500(spooled: Gateway, caplog):
    """The client closes its connection half-way through its body: no 500 nor ERROR traceback
    (starlette's ClientDisconnect was an unhandled error in POST /v1/jobs), an INFO access line
    with 499, and nothing left in the spool."""
    import asyncio

    caplog.set_level(logging.INFO)
    part = b'--b\r\ncontent-disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
    cases = [
        ("/v1/jobs", "audio/wav", b""),
        ("/v1/jobs", "multipart/form-data; boundary=b", part),
        ("/v1/audio/transcriptions", "multipart/form-data; boundary=b", part),
    ]
    for path, ctype, start in cases:
        before = len(_access(caplog, path))
        _, writer = await _raw_request(spooled, _post(path, 500_000, ctype), start + bytes(100_000))
        await asyncio.sleep(0.3)
        writer.close()
        await until(lambda: len(_access(caplog, path)) > before, timeout=10)  # noqa: B023
        line = _access(caplog, path)[-1]
        assert " 499 " in line, line
        assert [r.levelno for r in caplog.records if r.name == "access"][-1] == logging.INFO
    assert spooled.jobs.spool.files() == []
    assert not _errors(caplog), _errors(caplog)


async def test_request_headers_that_never_finish_are_cut_off(spooled: Gateway, caplog, monkeypatch):
    """uvicorn has no deadline for a request's headers: a client sending part of them (or nothing)
    held its connection for as long as it liked. Now: 408 and closed after the header timeout
    (1 s here), or just closed when nothing at all was sent; a keep-alive connection that starts
    its next request and stalls is cut off the same way."""
    import asyncio

    from services.gateway.http import server

    monkeypatch.setattr(server, "HEADER_TIMEOUT_SECONDS", 1.0, raising=False)
    caplog.set_level(logging.INFO)
    loop = asyncio.get_running_loop()
    for head, expect in (
        (b"POST /v1/jobs HTTP/1.1\r\nhost: test\r\ncontent-le", b"HTTP/1.1 408 "),
        (b"", b""),
    ):
        reader, writer = await _raw_request(spooled, head)
        started = loop.time()
        response = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert response.startswith(expect) and (expect or response == b""), response
        assert 0.9 < loop.time() - started < 5
    # One whole request, then half of the next one on the same connection.
    reader, writer = await _raw_request(spooled, b"GET /healthz HTTP/1.1\r\nhost: test\r\n\r\n")
    first = await asyncio.wait_for(reader.readuntil(b'{"status":"ok"}'), 10)
    assert first.startswith(b"HTTP/1.1 200 ")
    writer.write(b"GET /healthz HTTP/1.1\r\nho")
    started = loop.time()
    rest = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert rest.startswith(b"HTTP/1.1 408 ") and 0.9 < loop.time() - started < 5, rest
    # A request that completes in time is not affected.
    async with httpx.AsyncClient(base_url=base_url(spooled)) as h:
        assert (await h.get("/healthz")).status_code == 200
    assert not _errors(caplog), _errors(caplog)


async def test_a_body_over_the_limit_without_a_content_length_is_413(locked: Gateway):
    """A chunked upload past the byte limit is refused by the front door while it arrives: 413
    AUDIO_TOO_LARGE, the connection closed (FastAPI's form parser made it a bare 400 "There was an
    error parsing the body")."""

    async def chunked() -> AsyncIterator[bytes]:
        yield b'--b\r\ncontent-disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
        for _ in range(40):
            yield bytes(65536)

    async with httpx.AsyncClient(base_url=base_url(locked), headers={"x-api-key": KEY}) as h:
        resp = await h.post(
            "/v1/audio/transcriptions",
            content=chunked(),
            headers={"content-type": "multipart/form-data; boundary=b", "x-request-id": "big-1"},
        )
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "audio_too_large", resp.text
    assert resp.headers["connection"] == "close" and resp.headers.get_list("x-request-id") == ["big-1"]
