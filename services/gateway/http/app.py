"""The gateway's HTTP front door as an ASGI app (FastAPI): OpenAI-compatible transcription, jobs
over REST, live transcription over WebSocket, the web page and the API docs.

Every handler is a thin mapping onto the door-agnostic layer the gRPC servicers use
(`SpeechAPI`, `JobsAPI`): same validation, limits, quotas and errors; no second implementation.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, File, Form, Query, Request, UploadFile, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect
from starlette.responses import StreamingResponse

from services.gateway.auth import current_tenant
from services.gateway.http import live
from services.gateway.http.context import HttpContext
from services.gateway.http.errors import body_of, headers_of, status_of
from services.gateway.http.languages import name_of
from services.gateway.http.middleware import FrontDoor
from services.gateway.http.protojson import add_schema, enum_names, enum_number, to_json
from services.gateway.jobs import PIECE
from services.gateway.speech import VERSION
from services.shared import formats
from services.shared.context import request_id_var
from services.shared.errors import Internal, InvalidInput, NotFound, ServiceError
from stt.v1 import common_pb2, jobs_pb2, speech_pb2

log = logging.getLogger("gateway.http")

STATIC = Path(__file__).parent / "static"
SSE_KEEPALIVE = 15.0
RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
TRANSCRIPT_MEDIA = {
    "text": "text/plain; charset=utf-8",
    "json": "application/json",
    "srt": "application/x-subrip; charset=utf-8",
    "vtt": "text/vtt; charset=utf-8",
}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

DESCRIPTION = """\
Speech to text over HTTP, backed by the same code as the gRPC API (`stt.v1.Speech`, `stt.v1.Jobs`):
same limits, quotas and errors.

* **OpenAI-compatible**: `POST /v1/audio/transcriptions`, `GET /v1/models` (point any OpenAI client
  at `http://HOST:8000/v1`).
* **Jobs**: durable, prioritised transcription of recordings: create from an upload, get, list,
  cancel, retry, delete, transcript (text, json, srt, vtt), progress as server-sent events.
* **Live**: WebSocket `/v1/realtime?intent=transcription` (OpenAI Realtime transcription protocol)
  and `/v1/stream` (the gRPC StreamingRecognize in JSON); see README.

Authentication (when the server has API keys): `Authorization: Bearer KEY`. Errors are OpenAI's
shape: `{"error": {"message", "type", "param", "code"}}`, `code` being the `stt.v1.ErrorReason` in
lower case.
"""


def _error_response(exc: ServiceError) -> JSONResponse:
    status, _ = status_of(exc)
    return JSONResponse(body_of(exc), status_code=status, headers=headers_of(exc, request_id_var.get()))


def _field_of(loc: tuple[Any, ...] | list[Any]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header", "form")]
    return ".".join(parts) or None


def _sse(payload: dict[str, Any], event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()


def _error_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "title": "Error",
        "properties": {
            "error": {
                "type": "object",
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "param": {"type": ["string", "null"]},
                    "code": {"type": ["string", "null"], "description": "stt.v1 ErrorReason, lower case"},
                },
            }
        },
    }


def _ref(name: str) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}}


ERRORS: dict[int | str, dict[str, Any]] = {
    "4XX": {"description": "Bad request, unauthenticated, not found, over a limit", **_ref("Error")},
    "5XX": {"description": "Unavailable (retry after Retry-After) or a server fault", **_ref("Error")},
}


def create_app(ctx: HttpContext) -> Any:
    app = FastAPI(
        title="stt HTTP API",
        version=VERSION,
        description=DESCRIPTION,
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    app.state.ctx = ctx

    # -- errors ------------------------------------------------------------------------------------

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        field = _field_of(first.get("loc", ()))
        missing = first.get("type") == "missing"
        message = f"{field} is required" if missing else f"{field}: {first.get('msg', 'invalid value')}"
        return _error_response(
            InvalidInput(message, reason="MISSING_FIELD" if missing else "BAD_FIELD_VALUE", field=field)
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        body = {
            "error": {
                "message": str(exc.detail),
                "type": "invalid_request_error",
                "param": None,
                "code": "not_found" if exc.status_code == 404 else None,
            }
        }
        return JSONResponse(body, status_code=exc.status_code, headers=dict(exc.headers or {}))

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect) -> Response:
        # The client went away while sending its body, or the front door refused the body (too
        # large, stalled) and answered already. Nobody to answer: the access log line says which
        # (499, 413, 408); the handler's cleanups (e.g. the spooled upload) ran as it unwound.
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        rid = request_id_var.get()
        return _error_response(
            Internal(f"internal error; report it with request id {rid}", reason="INTERNAL")
        )

    # -- OpenAI-compatible -------------------------------------------------------------------------

    def model_card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": 0, "owned_by": "stt"}

    @app.get("/v1/models", tags=["openai"], summary="The loaded model and its aliases", responses=ERRORS)
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(n) for n in ctx.model_names()]}

    @app.get("/v1/models/{model}", tags=["openai"], summary="One model", responses=ERRORS)
    async def get_model(model: str) -> dict[str, Any]:
        if model not in ctx.model_names():
            raise NotFound(f"The model `{model}` does not exist", reason="BAD_FIELD_VALUE", field="model")
        return model_card(model)

    @app.post(
        "/v1/audio/transcriptions",
        tags=["openai"],
        summary="Transcribe a file (OpenAI-compatible)",
        description="Multipart upload as OpenAI's API takes it. `response_format`: json (`{text, usage}`), "
        "text, srt, vtt, verbose_json (`language`, `duration`, `segments` and, with "
        "`timestamp_granularities[]=word`, `words`). `stream=true` (json or text) answers with "
        "server-sent events `transcript.text.delta` per segment and a final `transcript.text.done`.",
        responses={
            200: {
                "description": "The transcript in the requested format",
                "content": {
                    "application/json": {},
                    "text/plain": {},
                    "text/vtt": {},
                    "application/x-subrip": {},
                    "text/event-stream": {},
                },
            },
            **ERRORS,
        },
    )
    async def create_transcription(
        file: UploadFile = File(..., description="The audio file (WAV, FLAC, MP3, OGG, WebM, M4A, ...)"),
        model: str = Form("whisper-1", description="The model: its own name or an alias (GET /v1/models)"),
        language: str = Form("", description="ISO-639-1 code, e.g. en"),
        prompt: str = Form("", description="Text that biases decoding: names, vocabulary"),
        temperature: float = Form(0.0, description="0..1; 0 is beam search"),
        response_format: Literal["json", "text", "srt", "vtt", "verbose_json"] = Form("json"),
        timestamp_granularities: list[Literal["word", "segment"]] = Form(
            [], alias="timestamp_granularities[]", description="verbose_json: word and/or segment"
        ),
        stream: bool = Form(False, description="Server-sent events (json and text formats)"),
    ) -> Response:
        ctx.check_model(model)
        if stream and response_format not in ("json", "text"):
            raise InvalidInput(
                f"stream=true works with response_format json or text, not {response_format}",
                reason="BAD_FIELD_VALUE",
                field="stream",
            )
        granular = set(timestamp_granularities)
        content = await file.read()
        request = speech_pb2.RecognizeRequest(
            config=common_pb2.RecognitionConfig(
                language_code=language,
                initial_prompt=prompt,
                temperature=temperature,
                enable_word_time_offsets=response_format == "verbose_json" and "word" in granular,
            ),
            content=content,
        )
        try:
            resp = await ctx.speech.recognize(request)
        except ServiceError as exc:
            raise exc.relocated(
                {
                    "content": "file",
                    "config.language_code": "language",
                    "config.initial_prompt": "prompt",
                    "config.temperature": "temperature",
                    "config.": "",
                }
            ) from None
        duration = resp.metadata.audio_duration_seconds
        usage = {"type": "duration", "seconds": math.ceil(duration)}
        if stream:
            return StreamingResponse(
                _deltas(resp, usage), media_type="text/event-stream", headers=SSE_HEADERS
            )
        segments = _segments(resp)
        if response_format == "json":
            return JSONResponse({"text": resp.transcript, "usage": usage})
        if response_format == "verbose_json":
            doc: dict[str, Any] = {
                "task": "transcribe",
                "language": name_of(resp.language_code),
                "duration": round(duration, 3),
                "text": resp.transcript,
            }
            if "segment" in granular or not granular:
                doc["segments"] = [
                    {
                        "id": i,
                        "seek": round(r.start_seconds * 100),
                        "start": round(r.start_seconds, 3),
                        "end": round(r.end_seconds, 3),
                        "text": r.transcript,
                        "tokens": [],
                        "temperature": temperature,
                        "avg_logprob": round(r.avg_logprob, 4),
                        "compression_ratio": 0.0,
                        "no_speech_prob": round(r.no_speech_prob, 4),
                    }
                    for i, r in enumerate(resp.results)
                ]
            if "word" in granular:
                doc["words"] = [
                    {
                        "word": w.word.strip(),
                        "start": round(w.start_seconds, 3),
                        "end": round(w.end_seconds, 3),
                    }
                    for r in resp.results
                    for w in r.words
                ]
            doc["usage"] = usage
            return JSONResponse(doc)
        rendered = formats.render(segments, response_format)
        media = {
            "text": "text/plain; charset=utf-8",
            "srt": "application/x-subrip; charset=utf-8",
            "vtt": "text/vtt; charset=utf-8",
        }[response_format]
        return PlainTextResponse(rendered, media_type=media)

    # -- jobs ----------------------------------------------------------------------------------------

    @app.post(
        "/v1/jobs",
        tags=["jobs"],
        summary="Create a job from an upload",
        description="Either multipart/form-data (`file` plus the fields below as form fields) or the raw "
        "audio as the request body (`Content-Type: audio/...` or `application/octet-stream`) with "
        "the fields as query parameters: the raw body is streamed to the job store without being "
        "held. `request_id` (or the `Idempotency-Key` header) makes a retried upload return the job "
        "the first attempt created. Validated (format, size, duration) before the job exists.",
        responses={200: {"description": "The job", **_ref("Job")}, **ERRORS},
        openapi_extra={
            "parameters": [
                {"name": n, "in": "query", "required": False, "schema": s, "description": d}
                for n, s, d in _JOB_FIELDS
            ],
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "required": ["file"],
                            "properties": {
                                "file": {"type": "string", "format": "binary"},
                                **{n: s for n, s, _ in _JOB_FIELDS},
                            },
                        }
                    },
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                },
            },
        },
    )
    async def create_job(request: Request) -> JSONResponse:
        ctype = request.headers.get("content-type", "")
        params: dict[str, str] = dict(request.query_params)
        if ctype.startswith("multipart/form-data"):
            form = await request.form(max_files=1, max_fields=32)
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise InvalidInput(
                    "the multipart body needs a `file` part", reason="MISSING_FIELD", field="file"
                )
            params.update({k: v for k, v in form.items() if isinstance(v, str)})
            params.setdefault("filename", getattr(upload, "filename", "") or "")
            chunks = _upload_chunks(upload)
            size = getattr(upload, "size", None) or 0
        else:
            chunks = _body_chunks(request)
            declared = request.headers.get("content-length", "")
            size = int(declared) if declared.isdigit() else 0
        meta = _job_metadata(params, request.headers.get("idempotency-key", ""), size)
        try:
            job = await ctx.jobs.create_job(current_tenant(), meta, chunks)
        except ServiceError as exc:
            raise exc.relocated(JOB_FIELDS) from None
        return JSONResponse(to_json(job))

    @app.get(
        "/v1/jobs",
        tags=["jobs"],
        summary="List jobs, newest first",
        responses={200: {"description": "A page of jobs", **_ref("ListJobsResponse")}, **ERRORS},
    )
    async def list_jobs(
        status: str = Query("", description="queued, running, completed, failed or cancelled (default: all)"),
        page_size: int = Query(0, ge=-INT32_MAX - 1, le=INT32_MAX, description="0: the server default"),
        page_token: str = Query("", description="next_page_token of the previous page"),
    ) -> JSONResponse:
        number = enum_number(jobs_pb2.JobStatus.DESCRIPTOR, status) if status else 0
        if number is None:
            raise InvalidInput(
                f"unknown status {status!r}; use one of "
                + ", ".join(enum_names(jobs_pb2.JobStatus.DESCRIPTOR)[1:]),
                reason="BAD_FIELD_VALUE",
                field="status",
            )
        resp = await ctx.jobs.list_jobs(
            current_tenant(),
            jobs_pb2.ListJobsRequest(status=number, page_size=page_size, page_token=page_token),  # type: ignore[arg-type]
        )
        return JSONResponse(to_json(resp))

    @app.get(
        "/v1/jobs/{job_id}",
        tags=["jobs"],
        summary="Get a job",
        responses={200: {"description": "The job", **_ref("Job")}, **ERRORS},
    )
    async def get_job(job_id: str) -> JSONResponse:
        return JSONResponse(to_json(await ctx.jobs.get_job(current_tenant(), job_id)))

    @app.get(
        "/v1/jobs/{job_id}/events",
        tags=["jobs"],
        summary="Progress as server-sent events",
        description="`event: job` with a JobEvent (the job now, then every change) until the job is "
        "COMPLETED, FAILED or CANCELLED; then the stream ends. A comment line every 15 s keeps "
        "proxies from closing an idle stream. On gateway shutdown: `event: error` (code "
        "`draining`); reconnect.",
        responses={200: {"content": {"text/event-stream": {}}, "description": "JobEvents"}, **ERRORS},
    )
    async def job_events(job_id: str) -> StreamingResponse:
        events = ctx.jobs.watch_job(current_tenant(), job_id)
        first = await anext(events)  # errors (not found, ...) before the stream starts
        return StreamingResponse(_job_sse(first, events), media_type="text/event-stream", headers=SSE_HEADERS)

    @app.post(
        "/v1/jobs/{job_id}/cancel",
        tags=["jobs"],
        summary="Cancel a job",
        responses={200: {"description": "The job", **_ref("Job")}, **ERRORS},
    )
    async def cancel_job(job_id: str) -> JSONResponse:
        return JSONResponse(to_json(await ctx.jobs.cancel_job(current_tenant(), job_id)))

    @app.post(
        "/v1/jobs/{job_id}/retry",
        tags=["jobs"],
        summary="Run a FAILED or CANCELLED job again",
        responses={200: {"description": "The job", **_ref("Job")}, **ERRORS},
    )
    async def retry_job(job_id: str) -> JSONResponse:
        return JSONResponse(to_json(await ctx.jobs.retry_job(current_tenant(), job_id)))

    @app.delete(
        "/v1/jobs/{job_id}",
        tags=["jobs"],
        summary="Delete a job and its results",
        status_code=204,
        responses=ERRORS,
    )
    async def delete_job(job_id: str) -> Response:
        await ctx.jobs.delete_job(current_tenant(), job_id)
        return Response(status_code=204)

    @app.get(
        "/v1/jobs/{job_id}/transcript",
        tags=["jobs"],
        summary="A COMPLETED job's transcript",
        responses={
            200: {
                "content": {m.split(";")[0]: {} for m in TRANSCRIPT_MEDIA.values()},
                "description": "The transcript",
            },
            **ERRORS,
        },
    )
    async def job_transcript(
        job_id: str, format: Literal["text", "json", "srt", "vtt"] = Query("text")
    ) -> Response:
        number = enum_number(common_pb2.TranscriptFormat.DESCRIPTOR, format)
        transcript = await ctx.jobs.transcript(current_tenant(), job_id, number or 0)
        return Response(transcript.content, media_type=TRANSCRIPT_MEDIA[format])

    @app.get(
        "/v1/queue",
        tags=["jobs"],
        summary="Queue statistics per priority",
        responses={200: {"description": "Queue statistics", **_ref("QueueStats")}, **ERRORS},
    )
    async def queue_stats() -> JSONResponse:
        return JSONResponse(to_json(await ctx.jobs.queue_stats(current_tenant())))

    @app.get(
        "/v1/info",
        tags=["server"],
        summary="Model, limits, features and your quotas",
        responses={200: {"description": "Server info", **_ref("ServerInfo")}, **ERRORS},
    )
    async def server_info() -> JSONResponse:
        return JSONResponse(to_json(await ctx.server_info()))

    # -- live ------------------------------------------------------------------------------------------

    @app.websocket("/v1/realtime")
    async def realtime_socket(websocket: WebSocket) -> None:
        await live.realtime(websocket, ctx)

    @app.websocket("/v1/stream")
    async def native_socket(websocket: WebSocket) -> None:
        await live.native_stream(websocket, ctx)

    # -- health, page, docs --------------------------------------------------------------------------

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> JSONResponse:
        ready = ctx.speech.pool.serving_count > 0 and not ctx.draining.is_set()
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="stt HTTP API",
            swagger_js_url="/static/docs/swagger-ui-bundle.js",
            swagger_css_url="/static/docs/swagger-ui.css",
            swagger_favicon_url="/favicon.ico",
        )

    app.mount("/static/docs", StaticFiles(directory=str(_swagger_dir())), name="docs-assets")
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        comps = schema.setdefault("components", {})
        defs = comps.setdefault("schemas", {})
        defs["Error"] = _error_schema()
        for desc in (
            jobs_pb2.Job.DESCRIPTOR,
            jobs_pb2.ListJobsResponse.DESCRIPTOR,
            jobs_pb2.JobEvent.DESCRIPTOR,
            jobs_pb2.QueueStats.DESCRIPTOR,
            speech_pb2.ServerInfo.DESCRIPTOR,
        ):
            add_schema(desc, defs)
        comps["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        schema["security"] = [{"bearer": []}]
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]

    origins = ctx.settings.cors_origins()
    outer: Any = app
    if origins:
        outer = CORSMiddleware(
            app,
            allow_origins=origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["x-request-id", "Retry-After"],
        )
    return FrontDoor(outer, ctx)


# -- helpers ---------------------------------------------------------------------------------------------

_JOB_FIELDS: list[tuple[str, dict[str, Any], str]] = [
    ("filename", {"type": "string"}, "the file's name, for display"),
    ("language", {"type": "string"}, "ISO-639-1 code, e.g. en (default: the model's, or detected)"),
    ("prompt", {"type": "string"}, "text that biases decoding"),
    ("priority", {"type": "string", "enum": ["high", "normal", "low"]}, "queue priority (default normal)"),
    ("request_id", {"type": "string"}, "idempotency key (also the Idempotency-Key header)"),
    ("word_timestamps", {"type": "boolean"}, "word times in the json transcript"),
    ("keep_audio", {"type": "boolean"}, "keep the audio after completion (for retry)"),
    ("beam_size", {"type": "integer"}, "beam size (0: the server default)"),
    ("temperature", {"type": "number"}, "0..1"),
]


# JobsAPI names fields as CreateJob does; over HTTP they are the form fields / query parameters.
JOB_FIELDS = {
    "audio_chunk": "file",
    "metadata.config.language_code": "language",
    "metadata.config.initial_prompt": "prompt",
    "metadata.config.": "",
    "metadata.size_bytes": "file",
    "metadata.": "",
}


def _swagger_dir() -> Path:
    import fastapi_offline

    return Path(fastapi_offline.__file__).parent / "static"


def _segments(resp: speech_pb2.RecognizeResponse) -> list[dict[str, Any]]:
    return [
        {
            "start": round(r.start_seconds, 3),
            "end": round(r.end_seconds, 3),
            "text": r.transcript,
            "words": [],
        }
        for r in resp.results
    ]


async def _deltas(resp: speech_pb2.RecognizeResponse, usage: dict[str, Any]) -> AsyncIterator[bytes]:
    """OpenAI's transcription stream: one delta per segment, then the whole text."""
    sent = False
    for r in resp.results:
        text = r.transcript.strip()
        if text:
            yield _sse(
                {"type": "transcript.text.delta", "delta": (" " if sent else "") + text, "logprobs": []}
            )
            sent = True
    yield _sse({"type": "transcript.text.done", "text": resp.transcript, "logprobs": [], "usage": usage})


async def _job_sse(
    first: jobs_pb2.JobEvent, events: AsyncIterator[jobs_pb2.JobEvent]
) -> AsyncIterator[bytes]:
    yield _sse(to_json(first), "job")
    nxt: asyncio.Future[jobs_pb2.JobEvent] | None = None
    try:
        while True:
            nxt = nxt or asyncio.ensure_future(anext(events))
            done, _ = await asyncio.wait({nxt}, timeout=SSE_KEEPALIVE)
            if not done:
                yield b": keepalive\n\n"
                continue
            try:
                event = nxt.result()
            except StopAsyncIteration:
                return
            except ServiceError as exc:
                yield _sse(body_of(exc), "error")
                return
            finally:
                if nxt.done():
                    nxt = None
            yield _sse(to_json(event), "job")
    finally:
        if nxt is not None and not nxt.done():
            nxt.cancel()  # that read must end before the stream is closed (see JobsAPI.watch_job)
            await asyncio.gather(nxt, return_exceptions=True)
        await events.aclose()  # type: ignore[attr-defined]


async def _upload_chunks(upload: Any) -> AsyncIterator[bytes]:
    while piece := await upload.read(PIECE):
        yield piece


async def _body_chunks(request: Request) -> AsyncIterator[bytes]:
    async for piece in request.stream():
        if piece:
            yield piece


INT32_MAX = 2**31 - 1  # the proto fields' range


def _job_metadata(params: dict[str, str], idempotency_key: str, size: int) -> jobs_pb2.JobMetadata:
    def number(name: str, kind: type) -> Any:
        raw = params.get(name, "")
        if raw == "":
            return kind(0)
        try:
            value = kind(raw)
        except ValueError:
            raise InvalidInput(
                f"{name} must be a number, not {raw[:40]!r}", reason="BAD_FIELD_VALUE", field=name
            ) from None
        if kind is int and not -INT32_MAX - 1 <= value <= INT32_MAX:
            raise InvalidInput(f"{name} {raw[:40]} is out of range", reason="BAD_FIELD_VALUE", field=name)
        return value

    priority = 0
    if params.get("priority"):
        found = enum_number(jobs_pb2.Priority.DESCRIPTOR, params["priority"])
        if found is None:
            raise InvalidInput(
                f"unknown priority {params['priority'][:40]!r}; use high, normal or low",
                reason="BAD_FIELD_VALUE",
                field="priority",
            )
        priority = found
    keep = params.get("keep_audio", "").lower() in ("1", "true", "yes", "on")
    return jobs_pb2.JobMetadata(
        request_id=params.get("request_id") or idempotency_key,
        filename=params.get("filename", ""),
        priority=priority,  # type: ignore[arg-type]
        size_bytes=size,
        keep_audio=keep,
        config=common_pb2.RecognitionConfig(
            language_code=params.get("language", ""),
            initial_prompt=params.get("prompt", ""),
            enable_word_time_offsets=params.get("word_timestamps", "").lower() in ("1", "true", "yes", "on"),
            beam_size=number("beam_size", int),
            temperature=number("temperature", float),
        ),
    )
