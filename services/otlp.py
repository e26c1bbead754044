"""A tiny OTLP/gRPC trace receiver: the local view of traces for `make cluster TRACING=1` and the
system tests. Not a collector: it keeps spans in memory and appends each to a JSON-lines file.

    python -m services.otlp serve [--port 4317] [--out traces.jsonl]   # receive (services export here)
    python -m services.otlp show traces.jsonl [--trace ID | --job ID] [--last 5]  # traces as trees

Point the services at it with OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4317. For a real UI, run
any OTLP-capable backend (Jaeger, Tempo, an OpenTelemetry Collector) and point the variable there.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2

_KINDS = {0: "unspecified", 1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}


@dataclass
class SpanRecord:
    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: str
    service: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any] = field(default_factory=dict)
    resource: dict[str, Any] = field(default_factory=dict)
    status: str = ""
    status_message: str = ""

    @property
    def seconds(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9


def _value(v: common_pb2.AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    if kind == "bytes_value":
        return v.bytes_value.hex()
    return getattr(v, kind) if kind else None


def _attributes(kvs: Iterable[common_pb2.KeyValue]) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in kvs}


def records(request: trace_service_pb2.ExportTraceServiceRequest) -> list[SpanRecord]:
    out = []
    for rs in request.resource_spans:
        resource = _attributes(rs.resource.attributes)
        for ss in rs.scope_spans:
            for sp in ss.spans:
                out.append(
                    SpanRecord(
                        trace_id=sp.trace_id.hex(),
                        span_id=sp.span_id.hex(),
                        parent_span_id=sp.parent_span_id.hex(),
                        name=sp.name,
                        kind=_KINDS.get(sp.kind, str(sp.kind)),
                        service=str(resource.get("service.name", "")),
                        start_ns=sp.start_time_unix_nano,
                        end_ns=sp.end_time_unix_nano,
                        attributes=_attributes(sp.attributes),
                        resource=resource,
                        status={0: "", 1: "ok", 2: "error"}.get(sp.status.code, ""),
                        status_message=sp.status.message,
                    )
                )
    return out


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every span received (and appends it to `out`, one JSON object per line)."""

    def __init__(self, out: str | Path | None = None) -> None:
        self.spans: list[SpanRecord] = []
        self.out = Path(out) if out else None
        self._changed = asyncio.Event()

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: object
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        new = records(request)
        self.spans.extend(new)
        if self.out is not None:
            with self.out.open("a") as fh:
                for r in new:
                    fh.write(json.dumps(asdict(r)) + "\n")
        self._changed.set()
        return trace_service_pb2.ExportTraceServiceResponse()

    async def wait_for(self, predicate: Any, timeout: float = 30.0) -> list[SpanRecord]:
        """Wait until predicate(spans) is true; returns the spans."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate(self.spans):
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"spans never matched; have {len(self.spans)}: {summary(self.spans)}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)
        return self.spans


@dataclass
class RunningReceiver:
    server: grpc.aio.Server
    receiver: Receiver
    port: int
    host: str = "127.0.0.1"

    @property
    def endpoint(self) -> str:
        """For OTEL_EXPORTER_OTLP_ENDPOINT (plaintext)."""
        return f"http://{self.host}:{self.port}"

    async def stop(self) -> None:
        await self.server.stop(0)


async def start_receiver(
    port: int = 0, *, host: str = "127.0.0.1", out: str | Path | None = None
) -> RunningReceiver:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)])
    receiver = Receiver(out)
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"could not bind {host}:{port}")
    await server.start()
    return RunningReceiver(server, receiver, bound, host)


# -- reading -------------------------------------------------------------------------------------------


def load(path: str | Path) -> list[SpanRecord]:
    out = []
    with open(path) as fh:
        for line in fh:
            if line.strip():
                out.append(SpanRecord(**json.loads(line)))
    return out


def by_trace(spans: Iterable[SpanRecord]) -> dict[str, list[SpanRecord]]:
    traces: dict[str, list[SpanRecord]] = defaultdict(list)
    for s in spans:
        traces[s.trace_id].append(s)
    return traces


def summary(spans: list[SpanRecord], limit: int = 30) -> str:
    return ", ".join(f"{s.service}:{s.name}" for s in spans[-limit:])


_SHOWN = ("stt.", "server.address")


def print_trace(spans: list[SpanRecord], file: TextIO = sys.stdout) -> None:
    """One trace as an indented tree: offset from the trace's start, duration, service, span."""
    ids = {s.span_id for s in spans}
    children: dict[str, list[SpanRecord]] = defaultdict(list)
    for s in spans:
        children[s.parent_span_id if s.parent_span_id in ids else ""].append(s)
    t0 = min(s.start_ns for s in spans)
    services = sorted({s.service for s in spans})
    print(f"trace {spans[0].trace_id}  ({len(spans)} spans; {', '.join(services)})", file=file)

    def walk(parent: str, depth: int) -> None:
        for s in sorted(children.get(parent, []), key=lambda x: x.start_ns):
            attrs = " ".join(f"{k}={v}" for k, v in s.attributes.items() if k.startswith(_SHOWN))
            flag = " ERROR" if s.status == "error" else ""
            print(
                f"  {(s.start_ns - t0) / 1e9:9.3f}s {s.seconds * 1000:9.1f}ms  {'  ' * depth}"
                f"[{s.service}] {s.name}{flag}  {attrs}".rstrip(),
                file=file,
            )
            walk(s.span_id, depth + 1)

    walk("", 0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m services.otlp", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="receive spans over OTLP/gRPC")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=4317)
    serve.add_argument("--out", default="traces.jsonl", help="append the spans here (JSON lines)")
    show = sub.add_parser("show", help="print received traces as trees")
    show.add_argument("file")
    show.add_argument("--trace", help="only this trace id")
    show.add_argument("--job", help="only the trace of this job")
    show.add_argument("--last", type=int, default=5, help="the N most recent traces (default 5)")
    args = p.parse_args(argv)
    if args.command == "show":
        traces = by_trace(load(args.file))
        if args.job:
            chosen = [
                t for t in traces.values() if any(s.attributes.get("stt.job_id") == args.job for s in t)
            ]
        elif args.trace:
            chosen = [traces[args.trace]] if args.trace in traces else []
        else:
            chosen = sorted(traces.values(), key=lambda ss: max(s.end_ns for s in ss))[-args.last :]
        for spans in chosen:
            print_trace(spans)
            print()
        return

    async def run() -> None:
        running = await start_receiver(args.port, host=args.host, out=args.out)
        print(f"OTLP/gRPC receiver on {running.endpoint}; spans go to {args.out}", flush=True)
        await running.server.wait_for_termination()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


if __name__ == "__main__":
    main()
