"""OpenTelemetry traces across every hop. Off (and free) unless switched on.

On when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set or
`STT_TRACING=true`; `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none` keep it off. The SDK reads
the other standard variables itself: `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
`OTEL_TRACES_SAMPLER(_ARG)`, `OTEL_PROPAGATORS`, `OTEL_BSP_*`, `OTEL_EXPORTER_OTLP_*` (headers,
certificates, timeout, compression). Spans go out over OTLP/gRPC (`OTEL_TRACES_EXPORTER=console`
prints them instead).

What is traced (span names in docs/operations.md):
- every RPC a SERVER span (services.shared.interceptors), every call to another service a CLIENT span
  whose context travels in the call's metadata (W3C `traceparent`), so a Recognize call is one trace
  through gateway, transcribers and their model calls;
- a job: the jobstore keeps the trace context of the CreateJob call with the job, and whichever
  gateway claims the job (again after a takeover) continues that trace: queue wait, each attempt,
  each chunk's model call, the writes that complete it;
- a stream: one SERVER span for the call, a span per hypothesis (a model call) and per final result.
Calls that happen all the time without a caller's trace (health checks, the dispatcher's ClaimJob long
poll, heartbeats) get no spans of their own.

Every helper returns at its first line when tracing is off (one module global read), so the seams in
the services cost nothing measurable then (bench: `python -m bench --only unary`, docs/operations.md).
This module imports no grpc: the domain code (dispatcher, batcher, sessions) may use it.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import socket
import time
from collections.abc import Awaitable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, TypeVar

log = logging.getLogger("tracing")

T = TypeVar("T")
Metadata = Sequence[tuple[str, Any]]
Attributes = Mapping[str, Any]

SERVER = "server"
CLIENT = "client"
INTERNAL = "internal"

# gRPC codes that make a SERVER span an error (OpenTelemetry semantic conventions for RPC): the
# caller's mistakes (INVALID_ARGUMENT, NOT_FOUND, ...) are not the server's errors.
SERVER_ERROR_CODES = frozenset(
    {"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"}
)

_on = False
_tracer: Any = None
_provider: Any = None


class _NoSpan:
    """What the helpers hand out when there is nothing to record (tracing off, or no trace)."""

    def set_attribute(self, key: str, value: Any) -> None:
        pass

    def set_attributes(self, attributes: Attributes) -> None:
        pass

    def add_event(self, name: str, attributes: Attributes | None = None) -> None:
        pass

    def is_recording(self) -> bool:
        return False

    def end(self, end_time: int | None = None) -> None:
        pass


NO_SPAN = _NoSpan()
_NO_SPAN_CM: AbstractContextManager[Any] = contextlib.nullcontext(NO_SPAN)


def enabled() -> bool:
    return _on


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def wanted(stt_tracing: bool = False, environ: Mapping[str, str] | None = None) -> bool:
    """Whether the settings and the standard variables ask for tracing."""
    env = os.environ if environ is None else environ
    if _truthy(env.get("OTEL_SDK_DISABLED")) or env.get("OTEL_TRACES_EXPORTER", "").strip() == "none":
        return False
    return bool(
        stt_tracing
        or _truthy(env.get("STT_TRACING"))
        or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def configure(service: str, stt_tracing: bool = False, *, exporter: Any = None) -> bool:
    """Switch tracing on for this process if asked to (or if `exporter` is given: tests).

    `service` becomes `service.name` (`stt-<service>`) unless OTEL_SERVICE_NAME or
    OTEL_RESOURCE_ATTRIBUTES name it. Returns whether tracing is on."""
    global _on, _tracer, _provider
    if exporter is None and not wanted(stt_tracing):
        return _on
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    shutdown()
    attributes: dict[str, Any] = {}
    if not os.environ.get("OTEL_SERVICE_NAME") and "service.name=" not in os.environ.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    ):
        attributes["service.name"] = f"stt-{service}"
    if "service.instance.id=" not in os.environ.get("OTEL_RESOURCE_ATTRIBUTES", ""):
        attributes["service.instance.id"] = f"{socket.gethostname()}:{os.getpid()}"
    provider = TracerProvider(resource=Resource.create(attributes))
    provider.add_span_processor(BatchSpanProcessor(exporter or _exporter_from_env()))
    _provider = provider
    _tracer = provider.get_tracer("stt")
    _on = True
    log.info(
        "tracing on",
        extra={
            "otlp_endpoint": os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
            or "http://localhost:4317",
        },
    )
    return True


def _exporter_from_env() -> Any:
    kind = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",")[0].strip() or "otlp"
    if kind == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if kind != "otlp":
        log.warning("OTEL_TRACES_EXPORTER=%s is not supported here; using otlp", kind)
    protocol = os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    )
    if protocol != "grpc":
        log.warning("OTLP protocol %r is not supported here; exporting over grpc", protocol)
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


def flush(timeout_seconds: float = 5.0) -> None:
    if _provider is not None:
        _provider.force_flush(int(timeout_seconds * 1000))


def shutdown() -> None:
    """Export what is left and switch tracing off (at exit; tests)."""
    global _on, _tracer, _provider
    provider, _provider, _tracer, _on = _provider, None, None, False
    if provider is not None:
        provider.shutdown()


# -- spans ------------------------------------------------------------------------------------------


def _kind(kind: str) -> Any:
    from opentelemetry.trace import SpanKind

    return {SERVER: SpanKind.SERVER, CLIENT: SpanKind.CLIENT}.get(kind, SpanKind.INTERNAL)


def _clean(attributes: Attributes | None) -> dict[str, Any] | None:
    if not attributes:
        return None
    return {k: v for k, v in attributes.items() if v is not None}


def _in_trace() -> bool:
    from opentelemetry import trace

    return bool(trace.get_current_span().get_span_context().is_valid)


def span(
    name: str, attributes: Attributes | None = None, *, kind: str = INTERNAL, child_only: bool = False
) -> AbstractContextManager[Any]:
    """`with span(...) as s:` a span that is current inside the block (`s.set_attribute(...)`).
    child_only: only within a trace (a call to another service made outside any trace gets none)."""
    if not _on or (child_only and not _in_trace()):
        return _NO_SPAN_CM
    return _tracer.start_as_current_span(name, kind=_kind(kind), attributes=_clean(attributes))


async def traced(name: str, aw: Awaitable[T], attributes: Attributes | None = None) -> T:
    """`await traced("job.chunk", call(...), {...})`: the awaitable inside a span."""
    if not _on:
        return await aw
    with _tracer.start_as_current_span(name, attributes=_clean(attributes)):
        return await aw


def set_attributes(attributes: Attributes) -> None:
    """On the current span (e.g. the RPC's SERVER span)."""
    if not _on:
        return
    from opentelemetry import trace

    trace.get_current_span().set_attributes(_clean(attributes) or {})


def epoch_ns(perf: float) -> int:
    """A time.perf_counter() reading as the wall-clock nanoseconds spans are stamped with."""
    return time.time_ns() - int((time.perf_counter() - perf) * 1e9)


def record(name: str, start_perf: float, end_perf: float, attributes: Attributes | None = None) -> None:
    """A finished interval (measured with time.perf_counter()) as a child of the current span."""
    if not _on or not _in_trace():
        return
    now_ns, now_perf = time.time_ns(), time.perf_counter()
    sp = _tracer.start_span(
        name,
        start_time=now_ns - int((now_perf - start_perf) * 1e9),
        attributes=_clean(attributes),
    )
    sp.end(end_time=now_ns - int((now_perf - end_perf) * 1e9))


# -- server side of an RPC (services.shared.interceptors) -------------------------------------------


def start_rpc(method: str, metadata: Metadata | None, *, quiet: bool = False) -> Any:
    """The SERVER span of one RPC, current until end_rpc; continues the caller's trace from the
    metadata. quiet: a method called all the time (probes, long polls) is only traced inside a
    caller's trace. Returns a handle for end_rpc, or None."""
    if not _on:
        return None
    from opentelemetry import context, propagate, trace

    parent = propagate.extract(_carrier(metadata))
    if quiet and not trace.get_current_span(parent).get_span_context().is_valid:
        return None
    path = method.lstrip("/")
    service, _, rpc = path.rpartition("/")
    sp = _tracer.start_span(
        path,
        context=parent,
        kind=_kind(SERVER),
        attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": rpc},
    )
    token = context.attach(trace.set_span_in_context(sp, parent))
    return sp, token


def end_rpc(handle: Any, code: str, code_value: int, error: str = "") -> None:
    if handle is None:
        return
    from opentelemetry.trace import Status, StatusCode

    sp, token = handle
    sp.set_attribute("rpc.grpc.status_code", code_value)
    if code in SERVER_ERROR_CODES:
        sp.set_status(Status(StatusCode.ERROR, f"{code}: {error}" if error else code))
    elif code != "OK" and error:
        sp.set_attribute("stt.error", f"{code}: {error}")
    sp.end()
    _detach(token)


def start_http(method: str, path: str, headers: Mapping[str, str]) -> Any:
    """The SERVER span of one HTTP request or WebSocket (the HTTP front door), current until
    end_http; continues a `traceparent` header. Returns a handle for end_http, or None."""
    if not _on:
        return None
    from opentelemetry import context, propagate, trace

    parent = propagate.extract(dict(headers))
    sp = _tracer.start_span(
        f"HTTP {method}",
        context=parent,
        kind=_kind(SERVER),
        attributes={"http.request.method": method, "url.path": path},
    )
    token = context.attach(trace.set_span_in_context(sp, parent))
    return sp, token


def end_http(handle: Any, status: Any, route: str | None = None) -> None:
    if handle is None:
        return
    status = int(status or 0)
    from opentelemetry.trace import Status, StatusCode

    sp, token = handle
    if route:
        sp.update_name(f"{sp.name} {route}")
        sp.set_attribute("http.route", route)
    sp.set_attribute("http.response.status_code", status)
    if status >= 500:
        sp.set_status(Status(StatusCode.ERROR, str(status)))
    sp.end()
    _detach(token)


def _detach(token: Any) -> None:
    """Make the context before start_rpc/start_http current again. A call that ended in another
    asyncio context (a stream closed by the event loop's finaliser) has nothing to restore there;
    OpenTelemetry's own detach would log that as an error with a traceback."""
    if isinstance(token, contextvars.Token):
        with contextlib.suppress(ValueError, RuntimeError):  # made in another Context, or used
            token.var.reset(token)
        return
    from opentelemetry import context

    with contextlib.suppress(Exception):
        context.detach(token)


def _carrier(metadata: Metadata | None) -> dict[str, str]:
    return {k: v for k, v in metadata or () if isinstance(v, str)}


# -- client side: context into the metadata of calls to other services ------------------------------


def inject(metadata: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """The metadata plus the current trace context (unchanged when off or outside a trace)."""
    if not _on:
        return metadata
    from opentelemetry import propagate

    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return (*metadata, *carrier.items()) if carrier else metadata


# -- trace context kept with a job ---------------------------------------------------------------


def traceparent() -> str:
    """The current span's context as a W3C traceparent ("" when off or outside a trace), to store."""
    if not _on:
        return ""
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier)
    return carrier.get("traceparent", "")


def start_from(
    traceparent_value: str,
    name: str,
    attributes: Attributes | None = None,
    *,
    start_time: float | None = None,
) -> Any:
    """A span continuing a stored trace (a new root if there is none); end it with end(). start_time:
    Unix seconds."""
    if not _on:
        return NO_SPAN
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    parent = (
        TraceContextTextMapPropagator().extract({"traceparent": traceparent_value})
        if traceparent_value
        else None
    )
    return _tracer.start_span(
        name,
        context=parent,
        attributes=_clean(attributes),
        start_time=int(start_time * 1e9) if start_time else None,
    )


def activate(sp: Any) -> AbstractContextManager[Any]:
    """Make a span from start_from() current inside the block (tasks created there inherit it)."""
    if not _on or sp is NO_SPAN:
        return _NO_SPAN_CM
    from opentelemetry import trace

    return trace.use_span(sp, end_on_exit=False)


def end(sp: Any, attributes: Attributes | None = None, *, error: str = "") -> None:
    if sp is NO_SPAN or not _on:
        return
    if attributes:
        sp.set_attributes(_clean(attributes) or {})
    if error:
        from opentelemetry.trace import Status, StatusCode

        sp.set_status(Status(StatusCode.ERROR, error))
    sp.end()


# -- logs ------------------------------------------------------------------------------------------


def log_ids() -> tuple[str, str] | None:
    """(trace id, span id) of the current span in hex, for log lines; None outside a trace."""
    if not _on:
        return None
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


def handle_log_ids(handle: Any) -> tuple[str, str] | None:
    """(trace id, span id) in hex of the SERVER span of start_rpc's `handle`, for the call's own log
    lines wherever they are written (the span need not be current there); None without one."""
    if handle is None:
        return None
    ctx = handle[0].get_span_context()
    if not ctx.is_valid:
        return None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


@contextlib.contextmanager
def capture(service: str = "test") -> Iterator[list[Any]]:
    """Tracing on in this process with spans kept in a list (tests and benchmarks)."""
    from opentelemetry.sdk.trace.export import SpanExportResult

    spans: list[Any] = []

    class _Keep:
        def export(self, batch: Iterable[Any]) -> Any:
            spans.extend(batch)
            return SpanExportResult.SUCCESS

        def shutdown(self) -> None:
            pass

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            return True

    configure(service, exporter=_Keep())
    try:
        yield spans
    finally:
        shutdown()
