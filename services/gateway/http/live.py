"""Live transcription over WebSocket, on the same streaming sessions as gRPC StreamingRecognize.

Two protocols, both thin adapters that feed `SpeechAPI.stream` (same validation, limits, quotas,
admission, policy and resumption as the gRPC door):

- `/v1/stream`, native: the gRPC StreamingRecognize in JSON. The first text message is a
  StreamingRecognitionConfig (proto JSON: `{"config": {"encoding": "WEBM_OPUS", "language_code":
  "en"}, "interim_results": true}`), then binary messages carry audio, then `{"type": "end"}` ends
  the audio. Each StreamingRecognizeResponse comes back as one JSON text message (REST mapping,
  see protojson). Errors: `{"error": {...}}` (OpenAI's shape) and the socket closes.
- `/v1/realtime?intent=transcription`, the OpenAI Realtime transcription protocol (beta
  `transcription_session.update` and GA `session.update` with `"type": "transcription"`):
  `input_audio_buffer.append` with base64 PCM16 (24 kHz by default) or G.711; server VAD turns
  give `input_audio_buffer.speech_started` / `speech_stopped` / `committed`, then
  `conversation.item.input_audio_transcription.delta` for each piece of text as it becomes final
  and `.completed` with the whole turn. The transcription's `delay` picks when text becomes final:
  `minimal`/`low` as soon as it is stable, `high`/`xhigh` when the turn's utterance ends (usually one
  delta per utterance, fewer word errors), `medium` or unset the server's default.
  `input_audio_buffer.commit` ends the current audio (all of it transcribed and completed); `clear`
  drops it. A session update is checked whole as it comes (as the stream will check its config);
  errors name the Realtime fields (`audio`, `session.input_audio_transcription.language`, ...),
  never the gRPC request's.
  Appends may split PCM16 samples (the odd byte waits for the next one); a commit must be whole.
  No audio for `stream_idle_seconds` (other events do not count) ends the session: STREAM_IDLE.

Drain (SIGTERM): live sockets go on while the shutdown grace lasts; those still open a little
before it runs out (the last quarter, at most 5 s) end their audio there, get the final results of
everything the server has read, an error with code "draining", and close with 1012 (service
restart): the client reconnects to another gateway.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import copy
import json
import logging
import math
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from google.protobuf import json_format
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from services.gateway.http.context import HttpContext
from services.gateway.http.errors import body_of, ws_close_code
from services.gateway.http.protojson import to_json
from services.gateway.requests import validate_config
from services.shared.errors import DeadlineExceeded, InvalidInput, NotFound, ServiceError, Unavailable
from stt.v1 import common_pb2, speech_pb2

log = logging.getLogger("gateway.http.live")

CONFIG_TIMEOUT = 10.0  # the native protocol's config message must come within this
QUEUE = 32  # audio messages buffered between the socket and the session (then the socket waits)
AUTH_SUBPROTOCOL = "openai-insecure-api-key."


def draining_error() -> Unavailable:
    return Unavailable("this gateway is shutting down; reconnect", reason="DRAINING")


def choose_subprotocol(ws: WebSocket) -> str | None:
    """Browsers pass the API key as a subprotocol; answer with one that is not the key."""
    offered = [p.strip() for p in ws.headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
    for p in offered:
        if not p.startswith(AUTH_SUBPROTOCOL):
            return p
    return None


class AudioFeed:
    """StreamingRecognizeRequests for SpeechAPI.stream from audio pushed by a socket reader. The
    queue is bounded: when the session is behind, the reader stops reading the socket."""

    def __init__(self, config: speech_pb2.StreamingRecognitionConfig) -> None:
        self.config = config
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(QUEUE)
        self.ended = False
        self.consumer: asyncio.Future[Any] | None = None

    async def requests(self) -> AsyncIterator[speech_pb2.StreamingRecognizeRequest]:
        yield speech_pb2.StreamingRecognizeRequest(streaming_config=self.config)
        while (item := await self.queue.get()) is not None:
            yield speech_pb2.StreamingRecognizeRequest(audio_content=item)

    async def _put(self, item: bytes | None) -> None:
        putter = asyncio.ensure_future(self.queue.put(item))
        waits: set[asyncio.Future[Any]] = {putter}
        if self.consumer is not None:
            waits.add(self.consumer)
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        if not putter.done():
            putter.cancel()  # the session ended: nobody reads the audio any more

    async def put(self, data: bytes) -> None:
        if not self.ended and data:
            await self._put(data)

    async def end(self) -> None:
        if not self.ended:
            self.ended = True
            await self._put(None)


class Socket:
    """Serialised sends (several tasks write to one socket) that never raise once it is gone."""

    def __init__(self, ws: WebSocket) -> None:
        self.ws = ws
        self.lock = asyncio.Lock()
        self.gone = False

    async def send(self, payload: dict[str, Any]) -> None:
        if self.gone:
            return
        async with self.lock:
            try:
                await self.ws.send_text(json.dumps(payload, ensure_ascii=False))
            except (WebSocketDisconnect, RuntimeError, OSError):
                self.gone = True

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if self.gone or self.ws.application_state == WebSocketState.DISCONNECTED:
            return
        self.gone = True
        with contextlib.suppress(Exception):
            await self.ws.close(code, reason[:120])


async def _race(*aws: asyncio.Future[Any], timeout: float | None = None) -> set[asyncio.Future[Any]]:
    done, _ = await asyncio.wait(set(aws), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    return done


@contextlib.asynccontextmanager
async def tracked(ctx: HttpContext) -> AsyncIterator[None]:
    """Count this socket as a live session while it runs (the drain waits for them)."""
    task = asyncio.current_task()
    assert task is not None
    ctx.live.add(task)
    ctx.live_done.clear()
    try:
        yield
    finally:
        ctx.live.discard(task)
        if not ctx.live:
            ctx.live_done.set()


# -- the native protocol -------------------------------------------------------------------------------


def parse_native_config(text: str) -> speech_pb2.StreamingRecognitionConfig:
    try:
        doc = json.loads(text)
    except ValueError:
        raise InvalidInput(
            "the first message must be a JSON StreamingRecognitionConfig", reason="MISSING_CONFIG",
            field="streaming_config",
        ) from None  # fmt: skip
    if isinstance(doc, dict) and "streaming_config" in doc:
        doc = doc["streaming_config"]
    if not isinstance(doc, dict):
        raise InvalidInput(
            "the first message must be a JSON object (a StreamingRecognitionConfig)",
            reason="MISSING_CONFIG", field="streaming_config",
        )  # fmt: skip
    config = doc.get("config")
    if isinstance(config, dict) and isinstance(config.get("encoding"), str):
        enc = config["encoding"].upper()
        config["encoding"] = enc if enc.startswith("AUDIO_ENCODING_") else "AUDIO_ENCODING_" + enc
    cfg = speech_pb2.StreamingRecognitionConfig()
    try:
        json_format.ParseDict(doc, cfg)
    except json_format.ParseError as exc:
        raise InvalidInput(
            f"bad streaming config: {exc}", reason="BAD_FIELD_VALUE", field="streaming_config"
        ) from None
    return cfg


async def native_stream(ws: WebSocket, ctx: HttpContext) -> None:
    await ws.accept(subprotocol=choose_subprotocol(ws))
    sock = Socket(ws)
    async with tracked(ctx):
        try:
            await _native(ws, sock, ctx)
        except ServiceError as exc:
            await sock.send(body_of(exc))
            await sock.close(ws_close_code(exc), exc.reason)
        except WebSocketDisconnect:
            sock.gone = True
        except Exception:
            log.exception("native stream failed")
            await sock.close(1011, "internal error")


async def _native(ws: WebSocket, sock: Socket, ctx: HttpContext) -> None:
    try:
        async with asyncio.timeout(CONFIG_TIMEOUT):  # (not wait_for: see SpeechAPI.stream)
            first = await ws.receive()
    except TimeoutError:
        raise DeadlineExceeded(
            f"no config message within {CONFIG_TIMEOUT:.0f}s", reason="STREAM_IDLE", field="streaming_config"
        ) from None
    if first["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(first.get("code", 1000))
    if first.get("text") is None:
        raise InvalidInput(
            "the first message must be the JSON config; audio may only follow it",
            reason="MISSING_CONFIG", field="streaming_config",
        )  # fmt: skip
    feed = AudioFeed(parse_native_config(first["text"]))

    async def pump() -> None:
        async for resp in ctx.speech.stream(feed.requests()):
            await sock.send(to_json(resp))

    session = asyncio.ensure_future(pump())
    feed.consumer = session
    drained = asyncio.ensure_future(ctx.cut.wait())
    recv: asyncio.Future[Any] | None = None
    try:
        while not feed.ended:
            recv = recv or asyncio.ensure_future(ws.receive())
            done = await _race(recv, session, drained)
            if session in done:
                break
            if drained in done:
                await feed.end()
                break
            msg = recv.result()
            recv = None
            if msg["type"] == "websocket.disconnect":
                session.cancel()
                with contextlib.suppress(BaseException):
                    await session
                sock.gone = True
                return
            if msg.get("bytes") is not None:
                await feed.put(msg["bytes"])
            elif msg.get("text") is not None:
                kind = _message_type(msg["text"])
                if kind in ("end", "eos", "close"):
                    await feed.end()
                elif kind == "config":
                    raise InvalidInput(
                        "the config may only be sent once, in the first message",
                        reason="DUPLICATE_CONFIG", field="streaming_config",
                    )  # fmt: skip
                else:
                    raise InvalidInput(
                        f"unknown message {kind!r}: send audio as binary messages and {{\"type\": \"end\"}} "
                        "to end it", reason="BAD_FIELD_VALUE", field="type",
                    )  # fmt: skip
        await session  # raises the session's error, if any
        if drained.done():
            raise draining_error()
        await sock.close(1000)
    finally:
        drained.cancel()
        if recv is not None:
            recv.cancel()
        if not session.done():
            session.cancel()
            with contextlib.suppress(BaseException):
                await session


def _message_type(text: str) -> str:
    """A text message's type: its "type", "config" for a config (which has none), or the text."""
    try:
        doc = json.loads(text)
    except ValueError:
        return text.strip().lower()
    if not isinstance(doc, dict):
        return ""
    if "type" not in doc and ("config" in doc or "streaming_config" in doc):
        return "config"
    return str(doc.get("type", "")).lower()


# -- the OpenAI Realtime transcription protocol ------------------------------------------------------


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


_ULAW = None
_ALAW = None


def _g711_tables() -> tuple[np.ndarray, np.ndarray]:
    global _ULAW, _ALAW
    if _ULAW is None or _ALAW is None:
        u = ~np.arange(256, dtype=np.int32) & 0xFF
        t = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
        _ULAW = np.where(u & 0x80, 0x84 - t, t - 0x84).astype(np.int16)
        a = np.arange(256, dtype=np.int32) ^ 0x55
        seg = (a & 0x70) >> 4
        mant = (a & 0x0F) << 4
        mag = np.where(seg == 0, mant + 8, (mant + 0x108) << np.maximum(seg - 1, 0))
        _ALAW = np.where(a & 0x80, mag, -mag).astype(np.int16)
    return _ULAW, _ALAW


def g711_to_pcm16(data: bytes, law: str) -> bytes:
    ulaw, alaw = _g711_tables()
    table = ulaw if law == "ulaw" else alaw
    return table[np.frombuffer(data, dtype=np.uint8)].astype("<i2").tobytes()


_DELAY_TIMING = {
    "minimal": speech_pb2.FINAL_RESULT_TIMING_STABLE,
    "low": speech_pb2.FINAL_RESULT_TIMING_STABLE,
    "medium": speech_pb2.FINAL_RESULT_TIMING_UNSPECIFIED,
    "high": speech_pb2.FINAL_RESULT_TIMING_UTTERANCE_END,
    "xhigh": speech_pb2.FINAL_RESULT_TIMING_UTTERANCE_END,
}


@dataclass
class RealtimeSession:
    """The session settings a client sets with (transcription_)session.update."""

    ga: bool  # the client speaks the GA protocol (session.*) rather than the beta one
    format: str = "pcm16"  # pcm16 | g711_ulaw | g711_alaw
    rate: int = 24000
    model: str = "whisper-1"
    language: str = ""
    prompt: str = ""
    # OpenAI's transcription `delay` (latency against accuracy): minimal / low -> final results as soon
    # as they are stable, high / xhigh -> only when the utterance ends, medium / unset -> the server's
    # default (STT_STREAM_FINAL_RESULTS).
    delay: str | None = None
    turn_detection: dict[str, Any] | None = field(
        default_factory=lambda: {
            "type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500,
        }
    )  # fmt: skip

    def describe(self) -> dict[str, Any]:
        transcription = {"model": self.model, "language": self.language or None, "prompt": self.prompt}
        if self.delay is not None:
            transcription["delay"] = self.delay
        if self.ga:
            fmt = {"pcm16": {"type": "audio/pcm", "rate": self.rate}, "g711_ulaw": {"type": "audio/pcmu"},
                   "g711_alaw": {"type": "audio/pcma"}}[self.format]  # fmt: skip
            return {
                "type": "transcription",
                "object": "realtime.transcription_session",
                "id": "",
                "audio": {
                    "input": {
                        "format": fmt,
                        "transcription": transcription,
                        "turn_detection": self.turn_detection,
                        "noise_reduction": None,
                    }
                },
                "include": [],
            }
        return {
            "object": "realtime.transcription_session",
            "id": "",
            "modalities": ["text"],
            "input_audio_format": self.format,
            "input_audio_transcription": transcription,
            "turn_detection": self.turn_detection,
            "input_audio_noise_reduction": None,
            "include": [],
            "client_secret": None,
        }

    def transcription_path(self, name: str = "") -> str:
        """Where a transcription setting is in this protocol's session (errors' `param`)."""
        base = "session.audio.input.transcription" if self.ga else "session.input_audio_transcription"
        return f"{base}.{name}" if name else base

    def format_path(self) -> str:
        return "session.audio.input.format" if self.ga else "session.input_audio_format"

    def update(self, session: dict[str, Any]) -> None:
        if "audio" in session:  # GA layout
            inp = (session.get("audio") or {}).get("input") or {}
            if "format" in inp:
                self._set_ga_format(inp["format"])
            if "transcription" in inp:
                self._set_transcription(inp["transcription"])
            if "turn_detection" in inp:
                self._set_turn_detection(inp["turn_detection"])
        if "input_audio_format" in session:
            fmt = session["input_audio_format"]
            if fmt not in ("pcm16", "g711_ulaw", "g711_alaw"):
                raise InvalidInput(
                    f"input_audio_format {fmt!r} is not supported; use pcm16, g711_ulaw or g711_alaw",
                    reason="UNSUPPORTED_ENCODING", field="session.input_audio_format",
                )  # fmt: skip
            self.format, self.rate = fmt, 24000 if fmt == "pcm16" else 8000
        if "input_audio_transcription" in session:
            self._set_transcription(session["input_audio_transcription"])
        if "turn_detection" in session:
            self._set_turn_detection(session["turn_detection"])

    def _set_ga_format(self, fmt: Any) -> None:
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind == "audio/pcm":
            rate = int(fmt.get("rate") or 24000)
            if not 8000 <= rate <= 48000:
                raise InvalidInput(
                    f"audio/pcm rate {rate} is out of range (8000..48000)", reason="BAD_SAMPLE_RATE",
                    field="session.audio.input.format.rate",
                )  # fmt: skip
            self.format, self.rate = "pcm16", rate
        elif kind in ("audio/pcmu", "audio/pcma"):
            self.format, self.rate = ("g711_ulaw" if kind == "audio/pcmu" else "g711_alaw"), 8000
        else:
            raise InvalidInput(
                f"audio format {fmt!r} is not supported; use audio/pcm, audio/pcmu or audio/pcma",
                reason="UNSUPPORTED_ENCODING", field="session.audio.input.format",
            )  # fmt: skip

    def _set_transcription(self, t: Any) -> None:
        if t is None:
            return
        if not isinstance(t, dict):
            raise InvalidInput("transcription settings must be an object", reason="BAD_FIELD_VALUE",
                               field=self.transcription_path())  # fmt: skip
        self.model = str(t.get("model") or self.model)
        if "language" in t:
            self.language = str(t.get("language") or "")
        if "prompt" in t:
            self.prompt = str(t.get("prompt") or "")
        if "delay" in t:
            delay = t.get("delay")
            if delay is not None and (not isinstance(delay, str) or delay not in _DELAY_TIMING):
                raise InvalidInput(
                    f"delay {delay!r} is not one of {', '.join(_DELAY_TIMING)}", reason="BAD_FIELD_VALUE",
                    field=self.transcription_path("delay"),
                )  # fmt: skip
            self.delay = delay

    def _set_turn_detection(self, td: Any) -> None:
        if td is not None and not (isinstance(td, dict) and td.get("type", "server_vad") == "server_vad"):
            raise InvalidInput(
                "turn_detection must be null (the client commits) or {\"type\": \"server_vad\"}",
                reason="BAD_FIELD_VALUE", field="session.turn_detection",
            )  # fmt: skip
        self.turn_detection = td

    def streaming_config(self) -> speech_pb2.StreamingRecognitionConfig:
        return speech_pb2.StreamingRecognitionConfig(
            config=common_pb2.RecognitionConfig(
                encoding=common_pb2.AUDIO_ENCODING_LINEAR16,
                sample_rate_hz=self.rate,
                audio_channel_count=1,
                language_code=self.language,
                initial_prompt=self.prompt,
            ),
            interim_results=False,
            final_result_timing=_DELAY_TIMING.get(self.delay or "medium", 0),  # type: ignore[arg-type]
        )

    def pcm(self, data: bytes) -> bytes:
        if self.format == "g711_ulaw":
            return g711_to_pcm16(data, "ulaw")
        if self.format == "g711_alaw":
            return g711_to_pcm16(data, "alaw")
        return data


def idle_error(idle: float) -> DeadlineExceeded:
    return DeadlineExceeded(
        f"no audio for {idle:g}s: the session is closed (send input_audio_buffer.append events, with "
        "silence to keep a quiet session open, or close the socket when the audio ends)",
        reason="STREAM_IDLE",
        field="audio",
    )


def realtime_error(exc: ServiceError, session: RealtimeSession, idle: float) -> ServiceError:
    """An error of the streaming session (StreamingRecognize's field paths and wording) as the
    Realtime client knows the fields: `param` is where the setting is in its session, or `audio`."""
    if exc.reason == "STREAM_IDLE" and exc.field == "audio_content":
        return idle_error(idle)
    fmt = session.format_path()
    return exc.relocated(
        {
            "audio_content": "audio",
            "streaming_config.config.language_code": session.transcription_path("language"),
            "streaming_config.config.initial_prompt": session.transcription_path("prompt"),
            "streaming_config.config.encoding": fmt,
            "streaming_config.config.sample_rate_hz": fmt,
            "streaming_config.config.audio_channel_count": fmt,
            "streaming_config.config.": session.transcription_path() + ".",
            "streaming_config.final_result_timing": session.transcription_path("delay"),
            "streaming_config.": "session.",
            "streaming_config": "session",
        }
    )


@dataclass
class _Item:
    id: str
    texts: list[str] = field(default_factory=list)
    stopped: bool = False
    committed: bool = False


class RealtimeConnection:
    def __init__(self, ws: WebSocket, sock: Socket, ctx: HttpContext, session: RealtimeSession) -> None:
        self.ws = ws
        self.sock = sock
        self.ctx = ctx
        self.session = session
        self.feed: AudioFeed | None = None
        self.task: asyncio.Future[None] | None = None
        self.fed_bytes = 0  # PCM16 bytes sent to earlier streams and this one (for offsets)
        self.offset = 0.0  # seconds of audio before the current stream
        self.item: _Item | None = None
        self.previous: str | None = None
        self.utterance_end_seen = False
        self.completions = 0
        self.billed = 0.0  # stream seconds accounted to completed items (their usage)
        # An odd byte of PCM16 (half a sample) from the last append: appends may split samples, as
        # gRPC's audio_content messages may; the buffer must be whole when it is committed.
        self.carry = b""
        self.idle = ctx.settings.stream_idle_seconds
        # Loop time of the client's last audio, or of the end of the server's work on it (a commit
        # waits for its transcription): the session ends after `idle` seconds more without audio.
        self.last_audio = asyncio.get_running_loop().time()

    def update(self, doc: dict[str, Any]) -> None:
        """Apply a session update whole or not at all: every setting is checked here, as the stream
        would check it, so a bad one is an error event now (the session keeps its settings) rather
        than a closed socket at the first append."""
        new = copy.deepcopy(self.session)
        new.update(doc)
        if new.model != self.session.model:
            self.ctx.check_model(new.model, field=new.transcription_path("model"))
        try:
            validate_config(
                new.streaming_config().config, prefix="streaming_config.config.", caps=self.ctx.speech.caps(),
                streaming=True,
            )  # fmt: skip
        except ServiceError as exc:
            raise realtime_error(exc, new, self.idle) from None
        self.session = new

    # -- server events --------------------------------------------------------------------------------

    async def emit(self, kind: str, **fields: Any) -> None:
        await self.sock.send({"type": kind, "event_id": _id("event"), **fields})

    async def error(self, exc: ServiceError, event_id: str | None = None) -> None:
        err = body_of(exc)["error"]
        err["event_id"] = event_id
        await self.emit("error", error=err)

    def _ms(self, seconds: float) -> int:
        return round((self.offset + seconds) * 1000)

    async def _new_item(self) -> _Item:
        self.item = _Item(_id("item"))
        return self.item

    async def _commit(self, item: _Item) -> None:
        if item.committed:
            return
        item.committed = True
        await self.emit("input_audio_buffer.committed", previous_item_id=self.previous, item_id=item.id)
        entry = {
            "id": item.id, "object": "realtime.item", "type": "message", "status": "completed",
            "role": "user", "content": [{"type": "input_audio", "transcript": None}],
        }  # fmt: skip
        if self.session.ga:
            await self.emit("conversation.item.added", previous_item_id=self.previous, item=entry)
        else:
            await self.emit("conversation.item.created", previous_item_id=self.previous, item=entry)

    async def _complete(self, item: _Item, seconds: float) -> None:
        await self._commit(item)
        await self.emit(
            "conversation.item.input_audio_transcription.completed",
            item_id=item.id,
            content_index=0,
            transcript=" ".join(item.texts),
            usage={"type": "duration", "seconds": math.ceil(max(0.0, seconds - self.billed))},
        )
        self.previous = item.id
        self.item = None
        self.completions += 1
        self.billed = max(self.billed, seconds)

    async def on_response(self, resp: speech_pb2.StreamingRecognizeResponse) -> None:
        manual = self.session.turn_detection is None
        seconds = self.offset + resp.total_billed_seconds
        kind = resp.speech_event_type
        if kind == speech_pb2.SPEECH_EVENT_TYPE_SPEECH_ACTIVITY_BEGIN and not manual:
            if self.item is not None and (self.item.texts or self.item.stopped):
                await self._complete(self.item, seconds)
            item = self.item or await self._new_item()
            await self.emit(
                "input_audio_buffer.speech_started",
                audio_start_ms=self._ms(resp.speech_event_offset_seconds),
                item_id=item.id,
            )
        elif kind == speech_pb2.SPEECH_EVENT_TYPE_SPEECH_ACTIVITY_END and not manual:
            item = self.item or await self._new_item()
            item.stopped = True
            await self.emit(
                "input_audio_buffer.speech_stopped",
                audio_end_ms=self._ms(resp.speech_event_offset_seconds),
                item_id=item.id,
            )
            await self._commit(item)
        for r in resp.results:
            text = r.transcript.strip()
            if not r.is_final:
                continue
            if r.utterance_end:
                self.utterance_end_seen = True
            if not text and not r.utterance_end:
                continue
            item = self.item or await self._new_item()
            if text:
                await self.emit(
                    "conversation.item.input_audio_transcription.delta",
                    item_id=item.id,
                    content_index=0,
                    delta=(" " if item.texts else "") + text,
                )
                item.texts.append(text)
            if manual:
                continue
            # The utterance is over: the server says so (utterance_end), or, from servers that do
            # not mark it, the final that follows the end of speech.
            if r.utterance_end or (item.stopped and not self.utterance_end_seen):
                await self._complete(item, seconds)

    # -- the audio stream -----------------------------------------------------------------------------

    def _start(self) -> AudioFeed:
        feed = AudioFeed(self.session.streaming_config())
        self.offset = self.fed_bytes / 2 / self.session.rate

        async def pump() -> None:
            last = 0.0
            try:
                async for resp in self.ctx.speech.stream(feed.requests()):
                    last = resp.total_billed_seconds or last
                    await self.on_response(resp)
            except ServiceError as exc:
                raise realtime_error(exc, self.session, self.idle) from None
            if self.item is not None:
                await self._complete(self.item, self.offset + last)

        self.feed = feed
        self.task = asyncio.ensure_future(pump())
        feed.consumer = self.task
        return feed

    async def append(self, audio_b64: Any) -> None:
        if audio_b64 is None:
            raise InvalidInput(
                "input_audio_buffer.append needs audio (base64)", reason="BAD_FIELD_VALUE", field="audio"
            )
        if not isinstance(audio_b64, str):
            raise InvalidInput("audio must be base64", reason="BAD_FIELD_VALUE", field="audio")
        try:
            data = base64.b64decode(audio_b64, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidInput("audio must be base64", reason="BAD_FIELD_VALUE", field="audio") from None
        pcm = self.carry + self.session.pcm(data)
        whole = len(pcm) - len(pcm) % 2
        pcm, self.carry = pcm[:whole], pcm[whole:]
        if pcm:
            feed = self.feed if self.feed is not None and not self.feed.ended else self._start()
            self.fed_bytes += len(pcm)
            await feed.put(pcm)
        if data:  # (an empty append is not audio, as an empty audio_content is not on gRPC)
            self.last_audio = asyncio.get_running_loop().time()

    def check_whole(self) -> None:
        """The buffer holds whole samples (before a commit)."""
        if self.carry:
            raise InvalidInput(
                "the input audio buffer ends with half a PCM16 sample (its audio is an odd number of "
                "bytes): append the missing byte before committing, or clear the buffer",
                reason="PARTIAL_FRAME",
                field="audio",
            )

    async def finish(self) -> None:
        """End the current stream's audio and wait until all of it is transcribed and sent."""
        if self.feed is None or self.task is None:
            return
        await self.feed.end()
        task, self.feed, self.task = self.task, None, None
        await task  # raises the stream's error, if any

    async def clear(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await self.task
        self.feed, self.task, self.item, self.carry = None, None, None, b""


async def realtime(ws: WebSocket, ctx: HttpContext) -> None:
    ga = "realtime=v1" not in ws.headers.get("openai-beta", "")
    await ws.accept(subprotocol=choose_subprotocol(ws))
    sock = Socket(ws)
    conn = RealtimeConnection(ws, sock, ctx, RealtimeSession(ga=ga))
    async with tracked(ctx):
        try:
            await conn.emit(
                "session.created" if ga else "transcription_session.created", session=conn.session.describe()
            )
            await _realtime_loop(ws, conn, ctx)
        except ServiceError as exc:
            await conn.error(exc)
            await sock.close(ws_close_code(exc), exc.reason)
        except WebSocketDisconnect:
            sock.gone = True
        except Exception:
            log.exception("realtime session failed")
            await sock.close(1011, "internal error")
        finally:
            await conn.clear()


async def _realtime_loop(ws: WebSocket, conn: RealtimeConnection, ctx: HttpContext) -> None:
    drained = asyncio.ensure_future(ctx.cut.wait())
    recv: asyncio.Future[Any] | None = None
    try:
        while True:
            recv = recv or asyncio.ensure_future(ws.receive())
            waits = [recv, drained] + ([conn.task] if conn.task is not None else [])
            # The stream idle rule (STT_STREAM_IDLE_SECONDS, as on gRPC): no audio for that long, with
            # or without a stream going, and the session ends. Other events do not count as audio.
            due = conn.last_audio + conn.idle - asyncio.get_running_loop().time()
            done = await _race(*waits, timeout=due) if due > 0 else set()
            if not done:
                # Transcribe what was sent (its results come first), then the error and the close.
                await conn.finish()
                raise idle_error(conn.idle)
            if conn.task is not None and conn.task in done:
                await conn.finish()  # the stream ended on its own (its error, or a limit)
                continue
            if drained in done:
                await conn.finish()
                raise draining_error()
            msg = recv.result()
            recv = None
            if msg["type"] == "websocket.disconnect":
                raise WebSocketDisconnect(msg.get("code", 1000))
            await _realtime_event(conn, msg.get("text") if msg.get("text") is not None else msg.get("bytes"))
    finally:
        drained.cancel()
        if recv is not None:
            recv.cancel()


async def _realtime_event(conn: RealtimeConnection, raw: str | bytes | None) -> None:
    try:
        event = json.loads(raw or "")
    except ValueError:
        event = None
    if not isinstance(event, dict):
        await conn.error(InvalidInput("events are JSON objects with a type", reason="BAD_FIELD_VALUE",
                                      field="type"))  # fmt: skip
        return
    kind, event_id = event.get("type"), event.get("event_id")
    try:
        if kind in ("transcription_session.update", "session.update"):
            session = event.get("session") or {}
            if not isinstance(session, dict):
                raise InvalidInput("session must be an object", reason="BAD_FIELD_VALUE", field="session")
            if session.get("type") not in (None, "transcription"):
                raise InvalidInput(
                    "this server only does transcription sessions (session.type \"transcription\")",
                    reason="BAD_FIELD_VALUE", field="session.type",
                )  # fmt: skip
            conn.update(session)
            await conn.emit(
                "session.updated" if kind == "session.update" else "transcription_session.updated",
                session=conn.session.describe(),
            )
        elif kind == "input_audio_buffer.append":
            await conn.append(event.get("audio"))
        elif kind == "input_audio_buffer.commit":
            if conn.task is None and not conn.carry:
                raise InvalidInput(
                    "the input audio buffer is empty: nothing to commit", reason="EMPTY_AUDIO", field="audio"
                )
            conn.check_whole()
            before = conn.completions
            await conn.finish()
            # The server's work on the client's audio is not the client's idleness.
            conn.last_audio = asyncio.get_running_loop().time()
            if conn.completions == before:
                # Nothing was left to complete (the buffer since the last turn held no speech): the
                # commit still gets its item, with an empty transcript, as OpenAI's does.
                await conn._complete(await conn._new_item(), conn.billed)
        elif kind == "input_audio_buffer.clear":
            await conn.clear()
            await conn.emit("input_audio_buffer.cleared")
        else:
            raise InvalidInput(f"unsupported event type {kind!r}", reason="BAD_FIELD_VALUE", field="type")
    except (InvalidInput, NotFound) as exc:
        await conn.error(exc, event_id)  # the session goes on, as OpenAI's does
