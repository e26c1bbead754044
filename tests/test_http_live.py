"""Live transcription over WebSocket with real clients: the official `openai` package speaking the
Realtime transcription protocol (beta `transcription_session.update` and GA `session.update`), and a
plain WebSocket client sending Opus/WebM as a browser's MediaRecorder does (native protocol)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
from typing import Any

import av
import httpx
import numpy as np
import openai
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from services.gateway.server import Gateway
from services.gateway.server import create_server as create_gateway
from stt.v1 import common_pb2, speech_pb2
from tests.conftest import gateway_settings, wait_serving
from tests.support import audio
from tests.support.speech import by_name, load_16k
from tests.support.text import normalize, wer

LIBRI = by_name("librispeech_2412-153948-0000")
JFK = by_name("jfk_inaugural_16k")
KEY = "sk-live-acme"


def ws_url(gw: Gateway, path: str) -> str:
    return f"ws://127.0.0.1:{gw.http_port}{path}"


def realtime_client(gw: Gateway, key: str) -> openai.AsyncOpenAI:
    # The beta client always picks wss:// unless websocket_base_url says otherwise.
    return openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{gw.http_port}/v1", websocket_base_url=ws_url(gw, "/v1"), api_key=key
    )


def pcm16(samples: np.ndarray, rate: int) -> bytes:
    return audio.encode(samples, "raw", rate=rate)


def live_webm(samples: np.ndarray) -> bytes:
    """Opus in WebM written as a live stream (no seeking back, no cues), as MediaRecorder writes it."""
    pcm = (np.clip(audio.resample(samples, 16000, 48000), -1, 1) * 32767).astype(np.int16)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="webm", options={"live": "1"}) as out:
        stream = out.add_stream("libopus", rate=48000, layout="mono")
        for i in range(0, len(pcm), 960):
            block = pcm[i : i + 960]
            if len(block) < 960:
                block = np.pad(block, (0, 960 - len(block)))
            frame = av.AudioFrame.from_ndarray(block.reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate = 48000
            frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


@pytest.fixture(scope="module")
def libri_24k() -> bytes:
    samples = np.concatenate([load_16k(LIBRI), audio.silence(1.5)])
    return pcm16(samples, 24000)


async def _append_all(send: Any, data: bytes, *, chunk: int = 4800, pace: float = 0.02) -> None:
    """100 ms appends at 5x real time."""
    for i in range(0, len(data), chunk):
        await send(base64.b64encode(data[i : i + chunk]).decode())
        await asyncio.sleep(pace)


async def test_realtime_beta_protocol_with_the_openai_client(gateway: Gateway, libri_24k: bytes):
    oai = realtime_client(gateway, "unused")
    async with oai.beta.realtime.connect(model="whisper-1", extra_query={"intent": "transcription"}) as conn:
        created = await conn.recv()
        assert created.type == "transcription_session.created"
        # Client commits (no server VAD): one item for the whole buffer.
        await conn.transcription_session.update(
            session={
                "input_audio_format": "pcm16",
                "input_audio_transcription": {"model": "whisper-1", "language": "en"},
                "turn_detection": None,  # type: ignore[typeddict-item]
            }
        )
        updated = await asyncio.wait_for(conn.recv(), 10)
        assert updated.type == "transcription_session.updated"
        assert updated.session.turn_detection is None  # type: ignore[union-attr]

        async def append(b64: str) -> None:
            await conn.input_audio_buffer.append(audio=b64)

        await _append_all(append, libri_24k)
        await conn.input_audio_buffer.commit()
        events = []
        async with asyncio.timeout(120):
            while True:
                event = await conn.recv()
                events.append(event)
                if event.type == "conversation.item.input_audio_transcription.completed":
                    break
    kinds = [e.type for e in events]
    assert "input_audio_buffer.committed" in kinds and "conversation.item.created" in kinds
    deltas = [e for e in events if e.type == "conversation.item.input_audio_transcription.delta"]
    done = events[-1]
    assert deltas and {d.item_id for d in deltas} == {done.item_id}  # type: ignore[union-attr]
    assert "".join(d.delta for d in deltas) == done.transcript  # type: ignore[union-attr]
    assert wer(LIBRI.text, done.transcript) <= 0.2, done.transcript  # type: ignore[union-attr]
    assert done.usage.seconds == pytest.approx(LIBRI.seconds + 1.5, abs=1)  # type: ignore[union-attr]


@pytest.mark.parametrize("delay", [None, "high"])
async def test_realtime_ga_protocol_with_server_vad_turns(gateway: Gateway, delay: str | None):
    """Two sentences with a pause: two turns, each started, stopped, committed and completed. With
    delay "high" (final results only when the utterance ends) no text of a turn comes before the
    turn's speech stopped."""
    samples = np.concatenate([load_16k(JFK), audio.silence(1.5), load_16k(LIBRI), audio.silence(1.5)])
    data = pcm16(samples, 24000)
    oai = realtime_client(gateway, "unused")
    async with oai.realtime.connect(model="whisper-1", extra_query={"intent": "transcription"}) as conn:
        assert (await conn.recv()).type == "session.created"
        await conn.session.update(
            session={
                "type": "transcription",
                "audio": {
                    "input": {
                        "format": {"type": "audio/pcm", "rate": 24000},
                        "transcription": {"model": "whisper-1", "language": "en", "delay": delay},
                        "turn_detection": {"type": "server_vad", "silence_duration_ms": 500},
                    }
                },
            }
        )
        updated = await asyncio.wait_for(conn.recv(), 10)
        assert updated.type == "session.updated"
        assert updated.session.audio.input.transcription.delay == delay  # type: ignore[union-attr]

        async def append(b64: str) -> None:
            await conn.input_audio_buffer.append(audio=b64)

        sender = asyncio.create_task(_append_all(append, data))
        started: list[str] = []
        completed: dict[str, str] = {}
        deltas: dict[str, str] = {}
        events = []
        # Until the turn of the last speech stopped (all the audio was sent before the server heard
        # it all: earlier turns can all be complete while the last has not started yet) and every
        # turn is complete.
        last_speech_ms = (JFK.seconds + 1.5 + LIBRI.seconds - 1.0) * 1000
        heard_to = 0.0
        async with asyncio.timeout(120):
            while not (sender.done() and heard_to >= last_speech_ms and set(completed) >= set(started)):
                event = await conn.recv()
                events.append(event)
                if event.type == "input_audio_buffer.speech_stopped":
                    heard_to = max(heard_to, event.audio_end_ms)
                if event.type == "input_audio_buffer.speech_started":
                    started.append(event.item_id)
                elif event.type == "conversation.item.input_audio_transcription.delta":
                    deltas[event.item_id] = deltas.get(event.item_id, "") + (event.delta or "")
                elif event.type == "conversation.item.input_audio_transcription.completed":
                    completed[event.item_id] = event.transcript
        await sender
    texts = [completed[i] for i in started if completed[i].strip()]
    assert len(texts) >= 2, texts
    assert wer(JFK.text + " " + LIBRI.text, " ".join(texts)) <= 0.2, texts
    for item, text in completed.items():
        assert deltas.get(item, "") == text
    stops = [e for e in events if e.type == "input_audio_buffer.speech_stopped"]
    begins = [e for e in events if e.type == "input_audio_buffer.speech_started"]
    assert len(begins) == len(stops) == len(started)
    for begin, stop in zip(begins, stops, strict=True):  # turns in order, on the stream's clock
        assert begin.item_id == stop.item_id and begin.audio_start_ms < stop.audio_end_ms
    assert begins[0].audio_start_ms < 1000
    second = (JFK.seconds + 1.5) * 1000  # where the second recording starts
    assert any(abs(b.audio_start_ms - second) < 1000 for b in begins), [b.audio_start_ms for b in begins]
    assert stops[-1].audio_end_ms <= (JFK.seconds + LIBRI.seconds + 1.6) * 1000
    if delay == "high":
        stopped: set[str] = set()
        for e in events:
            if e.type == "input_audio_buffer.speech_stopped":
                stopped.add(e.item_id)
            elif e.type == "conversation.item.input_audio_transcription.delta" and e.delta:
                assert e.item_id in stopped, f"text of turn {e.item_id} before its speech stopped"


REALTIME = "/v1/realtime?intent=transcription"
BETA = {"openai-beta": "realtime=v1"}


async def _event(ws: Any) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), 30))  # type: ignore[no-any-return]


async def _until(ws: Any, kind: str) -> list[dict[str, Any]]:
    """Events up to and including the first of this type."""
    events = []
    async with asyncio.timeout(120):
        while not events or events[-1]["type"] != kind:
            events.append(json.loads(await ws.recv()))
    return events


async def _until_closed(ws: Any) -> list[dict[str, Any]]:
    events = []
    with contextlib.suppress(ConnectionClosed):
        async with asyncio.timeout(30):
            while True:
                events.append(json.loads(await ws.recv()))
    return events


async def test_realtime_session_update_checks_language_and_model(gateway: Gateway):
    """A language or model the server cannot do is refused when the session is updated, as a bad
    input_audio_format is: an error event naming the setting where the client put it (an unknown
    model with HTTP's code), the whole update is not applied and the session goes on. (Both were
    `updated`; the first append then closed the socket with 1008 naming
    streaming_config.config.language_code.)"""
    async with connect(ws_url(gateway, REALTIME), additional_headers=BETA) as ws:
        assert (await _event(ws))["type"] == "transcription_session.created"
        good = {"input_audio_transcription": {"model": "whisper-1", "language": "en"}, "turn_detection": None}
        await ws.send(json.dumps({"type": "transcription_session.update", "session": good}))
        assert (await _event(ws))["type"] == "transcription_session.updated"
        path = "session.input_audio_transcription"
        refused = [
            ({"input_audio_transcription": {"language": "xx"}}, "unknown_language", f"{path}.language"),
            # The test model is English-only.
            ({"input_audio_transcription": {"language": "de"}}, "language_not_supported", f"{path}.language"),
            # With a valid format change beside it: nothing of the update is applied.
            (
                {"input_audio_format": "g711_ulaw", "input_audio_transcription": {"model": "bogus"}},
                "bad_field_value",
                f"{path}.model",
            ),
        ]
        for i, (session, code, param) in enumerate(refused):
            await ws.send(
                json.dumps({"type": "transcription_session.update", "event_id": f"u{i}", "session": session})
            )
            event = await _event(ws)
            assert event["type"] == "error", event
            error = event["error"]
            assert (error["code"], error["param"], error["event_id"]) == (code, param, f"u{i}"), error
        assert error["type"] == "not_found_error"  # the unknown model: as HTTP's 404
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.http_port}") as http:
            answer = await http.post(
                "/v1/audio/transcriptions", data={"model": "bogus"}, files={"file": ("a.wav", b"RIFF")}
            )
        assert answer.status_code == 404 and answer.json()["error"]["code"] == error["code"]
        # The session kept its settings, and transcribes with them.
        await ws.send(json.dumps({"type": "transcription_session.update", "session": {}}))
        kept = (await _event(ws))["session"]
        assert kept["input_audio_format"] == "pcm16", kept
        assert kept["input_audio_transcription"]["language"] == "en", kept
        assert kept["input_audio_transcription"]["model"] == "whisper-1", kept
        speech = pcm16(load_16k(LIBRI)[: 16000 * 3], 24000)
        await ws.send(
            json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(speech).decode()})
        )
        await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        events = await _until(ws, "conversation.item.input_audio_transcription.completed")
        assert not [e for e in events if e["type"] == "error"], events
        assert events[-1]["transcript"].strip(), events[-1]
    # GA sessions name the setting where GA puts it.
    async with connect(ws_url(gateway, REALTIME)) as ws:
        assert (await _event(ws))["type"] == "session.created"
        for transcription, param in (({"language": "xx"}, "language"), ({"model": "bogus"}, "model")):
            await ws.send(
                json.dumps(
                    {
                        "type": "session.update",
                        "session": {
                            "type": "transcription",
                            "audio": {"input": {"transcription": transcription}},
                        },
                    }
                )
            )
            error = (await _event(ws))["error"]
            assert error["param"] == f"session.audio.input.transcription.{param}", error


async def test_realtime_append_without_audio_is_an_error(gateway: Gateway):
    """An append without `audio` is refused as one with audio that is not base64 (it was ignored
    without a word); the session goes on."""
    async with connect(ws_url(gateway, REALTIME), additional_headers=BETA) as ws:
        assert (await _event(ws))["type"] == "transcription_session.created"
        for i, append in enumerate(({}, {"audio": None}, {"audio": 123}, {"audio": "%%%"})):
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "event_id": f"a{i}", **append}))
            event = await _event(ws)
            assert event["type"] == "error", (append, event)
            assert event["error"]["code"] == "bad_field_value" and event["error"]["param"] == "audio", event
            assert event["error"]["event_id"] == f"a{i}"
        # Still open; none of them added audio.
        await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        assert (await _event(ws))["error"]["code"] == "empty_audio"


async def test_realtime_appends_may_split_samples(gateway: Gateway, libri_24k: bytes):
    """PCM16 appends of an odd number of bytes are taken (the odd byte goes with the next), as gRPC
    and /v1/stream take audio messages; only a commit of an odd total is refused (partial_frame,
    param audio), and the buffer is kept for the missing byte. (Each odd append was refused and
    its audio dropped: the transcript was empty.)"""
    async with connect(ws_url(gateway, REALTIME), additional_headers=BETA) as ws:
        assert (await _event(ws))["type"] == "transcription_session.created"
        await ws.send(
            json.dumps({"type": "transcription_session.update", "session": {"turn_detection": None}})
        )
        assert (await _event(ws))["type"] == "transcription_session.updated"

        async def append(b64: str) -> None:
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": b64}))

        await _append_all(append, libri_24k, chunk=4801)
        await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        events = await _until(ws, "conversation.item.input_audio_transcription.completed")
        assert not [e for e in events if e["type"] == "error"], [e for e in events if e["type"] == "error"]
        assert wer(LIBRI.text, events[-1]["transcript"]) <= 0.2, events[-1]["transcript"]
        # A commit of an odd number of bytes: refused, the buffer kept; with the missing byte it goes.
        await append(base64.b64encode(bytes(4801)).decode())
        await ws.send(json.dumps({"type": "input_audio_buffer.commit", "event_id": "odd"}))
        error = (await _event(ws))["error"]
        assert (error["code"], error["param"], error["event_id"]) == ("partial_frame", "audio", "odd"), error
        await append(base64.b64encode(bytes(1)).decode())
        await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        events = await _until(ws, "conversation.item.input_audio_transcription.completed")
        assert not [e for e in events if e["type"] == "error"], events


async def test_native_stream_of_an_odd_total_names_audio_content(gateway: Gateway):
    """Messages may split 16-bit samples; a stream whose audio ends in half of one is PARTIAL_FRAME
    naming the request's audio field, audio_content (it named `content`, Recognize's field)."""
    data = pcm16(load_16k(LIBRI)[:8000], 16000) + b"\x00"
    async with connect(ws_url(gateway, "/v1/stream")) as ws:
        await ws.send(json.dumps({"config": {"encoding": "LINEAR16", "sample_rate_hz": 16000}}))
        for i in range(0, len(data), 3201):
            await ws.send(data[i : i + 3201])
        await ws.send(json.dumps({"type": "end"}))
        messages = await _until_closed(ws)
        assert ws.close_code == 1008
    errors = [m["error"] for m in messages if "error" in m]
    assert len(errors) == 1 and errors[0]["code"] == "partial_frame", messages
    assert errors[0]["param"] == "audio_content", errors


async def test_realtime_session_without_audio_ends_after_the_stream_idle_time(transcriber, jobstore):  # type: ignore[no-untyped-def]
    """STT_STREAM_IDLE_SECONDS applies to Realtime sessions as to gRPC streams: no audio for that
    long (other events do not count) and the session gets a stream_idle error worded for the
    socket, then closes with 1008; also when the audio stops while its stream goes on. (A session
    that never sent audio stayed open for a minute; one whose audio stopped got the gRPC stream's
    error: 'half-close it', param audio_content.)"""
    gw = await create_gateway(
        gateway_settings(
            f"127.0.0.1:{transcriber.port}", jobstore_address=f"127.0.0.1:{jobstore.port}",
            dispatch_concurrency=0, stream_idle_seconds=1.0,
        ),
        port=0,
    )  # fmt: skip
    try:
        await wait_serving(gw)
        silence = base64.b64encode(bytes(4800)).decode()  # 100 ms
        for audio_first in (False, True):
            async with connect(ws_url(gw, REALTIME), additional_headers=BETA) as ws:
                assert (await _event(ws))["type"] == "transcription_session.created"
                await ws.send(json.dumps({"type": "transcription_session.update", "session": {}}))
                if audio_first:
                    await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": silence}))
                events = await _until_closed(ws)
                assert ws.close_code == 1008, (audio_first, ws.close_code)
            assert events[0]["type"] == "transcription_session.updated", events
            errors = [e["error"] for e in events if e["type"] == "error"]
            assert len(errors) == 1 and errors[0]["code"] == "stream_idle", (audio_first, events)
            assert errors[0]["param"] == "audio", errors
            assert "input_audio_buffer.append" in errors[0]["message"], errors
            assert "half-close" not in errors[0]["message"], errors
    finally:
        await gw.stop(0)


async def test_native_protocol_with_webm_opus_as_mediarecorder_sends_it(gateway: Gateway):
    data = live_webm(np.concatenate([load_16k(LIBRI), audio.silence(1.0)]))
    finals, interims = [], []
    async with connect(ws_url(gateway, "/v1/stream")) as ws:
        await ws.send(
            json.dumps({"config": {"encoding": "WEBM_OPUS", "language_code": "en"}, "interim_results": True})
        )
        for i in range(0, len(data), 1000):  # ~250 ms of 32 kbit/s Opus per message
            await ws.send(data[i : i + 1000])
            await asyncio.sleep(0.01)
        await ws.send(json.dumps({"type": "end"}))
        async with asyncio.timeout(120):
            async for message in ws:
                resp = json.loads(message)
                assert "error" not in resp, resp
                for r in resp["results"]:
                    (finals if r["is_final"] else interims).append(r)
        assert ws.close_code == 1000
    text = " ".join(r["transcript"] for r in finals)
    assert wer(LIBRI.text, text) <= 0.2, text
    assert interims and all(0 <= r["stability"] < 1 for r in interims)
    ends = [r["end_seconds"] for r in finals]
    assert ends == sorted(ends) and ends[-1] <= LIBRI.seconds + 1.1


async def test_native_protocol_errors_and_keys(transcriber, jobstore):  # type: ignore[no-untyped-def]
    gw = await create_gateway(
        gateway_settings(
            f"127.0.0.1:{transcriber.port}", jobstore_address=f"127.0.0.1:{jobstore.port}",
            api_keys=f"{KEY}:acme", dispatch_concurrency=0,
        ),
        port=0,
    )  # fmt: skip
    try:
        await wait_serving(gw)
        with pytest.raises(InvalidStatus) as denied:
            async with connect(ws_url(gw, "/v1/stream")):
                pass
        assert denied.value.response.status_code == 401
        # Browsers pass the key as a subprotocol; the server answers with the other one.
        async with connect(
            ws_url(gw, "/v1/stream"), subprotocols=["stt", f"openai-insecure-api-key.{KEY}"]
        ) as ws:  # type: ignore[list-item]
            assert ws.subprotocol == "stt"
            await ws.send(
                json.dumps(
                    {"config": {"encoding": "LINEAR16", "sample_rate_hz": 16000, "language_code": "de"}}
                )
            )
            error = json.loads(await ws.recv())["error"]
            assert (
                error["code"] == "language_not_supported"
                and error["param"] == "streaming_config.config.language_code"
            )
            with pytest.raises(ConnectionClosed):
                await ws.recv()
            assert ws.close_code == 1008
        async with connect(
            ws_url(gw, "/v1/stream"), additional_headers={"authorization": f"Bearer {KEY}"}
        ) as ws:
            await ws.send(b"audio before any config")
            error = json.loads(await ws.recv())["error"]
            assert error["code"] == "missing_config"
        async with connect(
            ws_url(gw, "/v1/stream"), additional_headers={"authorization": f"Bearer {KEY}"}
        ) as ws:
            # A second config right after the first (before the session has read anything): answered
            # at once, as gRPC answers it, not when the stream's idle timer (30 s) ends the session.
            config = json.dumps({"config": {"encoding": "LINEAR16", "sample_rate_hz": 16000}})
            await ws.send(config)
            await ws.send(json.dumps({"streaming_config": json.loads(config)}))  # the other form
            error = json.loads(await asyncio.wait_for(ws.recv(), 10))["error"]
            assert error["code"] == "duplicate_config", error
        oai = realtime_client(gw, KEY)
        async with oai.beta.realtime.connect(
            model="whisper-1", extra_query={"intent": "transcription"}
        ) as conn:
            await conn.recv()
            await conn.send({"type": "input_audio_buffer.append", "audio": "%%% not base64"})  # type: ignore[arg-type]
            bad = await asyncio.wait_for(conn.recv(), 10)
            assert bad.type == "error" and bad.error.param == "audio"  # type: ignore[union-attr]
            await conn.send({"type": "response.create"})
            unknown = await asyncio.wait_for(conn.recv(), 10)
            assert unknown.type == "error" and unknown.error.param == "type"  # type: ignore[union-attr]
            for delay in ([], "fast"):  # not one of minimal, low, medium, high, xhigh
                await conn.send(
                    {
                        "type": "transcription_session.update",
                        "session": {"input_audio_transcription": {"model": "whisper-1", "delay": delay}},
                    }  # type: ignore[arg-type]
                )
                bad_delay = await asyncio.wait_for(conn.recv(), 10)
                assert bad_delay.type == "error", bad_delay
                assert bad_delay.error.param == "session.input_audio_transcription.delay"  # type: ignore[union-attr]
    finally:
        await gw.stop(0)


async def test_drain_lets_live_sockets_finish_and_cuts_the_rest(transcriber, jobstore):  # type: ignore[no-untyped-def]
    gw = await create_gateway(
        gateway_settings(
            f"127.0.0.1:{transcriber.port}", jobstore_address=f"127.0.0.1:{jobstore.port}",
            dispatch_concurrency=0, shutdown_grace_seconds=8.0,
        ),
        port=0,
    )  # fmt: skip
    await wait_serving(gw)
    speech = load_16k(LIBRI)

    async def offline(samples: np.ndarray) -> str:
        resp = await gw.speech.recognize(
            speech_pb2.RecognizeRequest(
                config=common_pb2.RecognitionConfig(
                    encoding=common_pb2.AUDIO_ENCODING_LINEAR16, sample_rate_hz=16000
                ),
                content=pcm16(samples, 16000),
            )
        )
        return resp.transcript

    async def stream(samples: np.ndarray, pace: float, started: asyncio.Event) -> tuple[list[str], Any, int]:
        finals: list[str] = []
        error = None
        async with connect(ws_url(gw, "/v1/stream")) as ws:
            await ws.send(json.dumps({"config": {"encoding": "LINEAR16", "sample_rate_hz": 16000}}))
            data = pcm16(samples, 16000)

            async def send() -> None:
                with contextlib.suppress(ConnectionClosed):
                    for i in range(0, len(data), 3200):  # 100 ms
                        await ws.send(data[i : i + 3200])
                        started.set()
                        await asyncio.sleep(pace)
                    await ws.send(json.dumps({"type": "end"}))

            sender = asyncio.create_task(send())
            with contextlib.suppress(ConnectionClosed):  # 1012 is not a normal close
                while True:
                    resp = json.loads(await ws.recv())
                    if "error" in resp:
                        error = resp["error"]
                    else:
                        finals += [r["transcript"] for r in resp["results"] if r["is_final"]]
            sender.cancel()
            return finals, error, ws.close_code or 0

    short, long_ = speech[: 16000 * 4], speech
    short_offline, long_offline = await offline(short), await offline(long_)
    try:
        a_started, b_started = asyncio.Event(), asyncio.Event()
        long_task = asyncio.create_task(stream(long_, 0.1, b_started))  # real time: 11.7 s
        await b_started.wait()
        short_task = asyncio.create_task(stream(short, 0.02, a_started))
        await a_started.wait()
        stopping = asyncio.create_task(gw.stop())  # grace 8 s: live sockets are cut at 6 s
        async with asyncio.timeout(60):
            short_finals, short_error, short_code = await short_task
            long_finals, long_error, long_code = await long_task
            await stopping
        # A new connection is refused once the drain has begun.
        with pytest.raises(OSError):
            async with connect(ws_url(gw, "/v1/stream"), open_timeout=5):
                pass
    finally:
        await gw.stop(0)
    # The short stream ended on its own during the drain: complete, closed normally.
    assert short_code == 1000 and short_error is None
    assert wer(short_offline, " ".join(short_finals)) <= 0.25, short_finals
    # The long one was cut: final results for what the server had read, then "draining" and 1012.
    assert long_code == 1012 and long_error is not None and long_error["code"] == "draining"
    said = normalize(" ".join(long_finals)).split()
    reference = normalize(long_offline).split()
    assert 5 <= len(said) < len(reference)
    assert wer(" ".join(reference[: len(said)]), " ".join(said)) <= 0.25, (reference, said)
