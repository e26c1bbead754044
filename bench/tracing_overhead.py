"""What tracing costs per gRPC call, and which way of tracing gRPC costs less.

    python -m bench.tracing_overhead [--calls 3000]

One process serves a trivial unary method through the services' real server (our ServiceInterceptor:
request id, access log, metrics) and calls it over loopback, sequentially, in three ways, each in a
fresh subprocess:
- off:   tracing off (the default);
- ours:  services.shared.tracing on: our interceptor's SERVER span, a CLIENT span and the traceparent
         injected into the metadata at the call site (what the services do);
- otel:  the same SDK and exporter, spans made by opentelemetry-instrumentation-grpc's aio client
         interceptors and aio server interceptor instead (the instrumentation installed outermost,
         so it sees the status our interceptor sets).
Spans go to a BatchSpanProcessor whose exporter drops them (export cost is off the call path in
both cases). Prints p50/p95 call latency and the process CPU time per call (client + server).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from typing import Any

import grpc

METHOD = "/bench.Echo/Echo"


def _handler() -> grpc.GenericRpcHandler:
    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    return grpc.method_handlers_generic_handler(
        "bench.Echo",
        {"Echo": grpc.unary_unary_rpc_method_handler(echo, lambda b: b, lambda b: b)},
    )


class _Drop:
    def export(self, batch: Any) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


async def _run(mode: str, calls: int) -> dict[str, Any]:
    import logging

    from services.shared import tracing
    from services.shared.config import CommonSettings
    from services.shared.interceptors import ServiceInterceptor

    logging.getLogger().setLevel(logging.WARNING)
    interceptors: list[Any] = [ServiceInterceptor()]
    client_interceptors: list[Any] | None = None
    if mode == "ours":
        tracing.configure("bench", exporter=_Drop())
    elif mode == "otel":
        from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(_Drop()))
        interceptors.insert(0, aio_server_interceptor(tracer_provider=provider))
        client_interceptors = aio_client_interceptors(tracer_provider=provider)
    settings = CommonSettings()
    from services.shared.server import server_options

    server = grpc.aio.server(interceptors=interceptors, options=server_options(settings, 1 << 20))
    server.add_generic_rpc_handlers((_handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", interceptors=client_interceptors)
    call = channel.unary_unary(METHOD, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    payload = b"x" * 64
    base = (("x-request-id", "bench"),)

    async def one() -> None:
        if mode == "ours":
            with tracing.span(METHOD, kind=tracing.CLIENT):
                await call(payload, timeout=10, metadata=tracing.inject(base))
        else:
            await call(payload, timeout=10, metadata=base)

    for _ in range(300):  # warm up
        await one()
    lat: list[float] = []
    cpu0 = time.process_time()
    for _ in range(calls):
        t0 = time.perf_counter()
        await one()
        lat.append(time.perf_counter() - t0)
    cpu = time.process_time() - cpu0
    await channel.close()
    await server.stop(0)
    tracing.shutdown()
    lat.sort()
    return {
        "mode": mode,
        "calls": calls,
        "p50_us": round(1e6 * statistics.median(lat), 1),
        "p95_us": round(1e6 * lat[int(0.95 * len(lat))], 1),
        "cpu_us_per_call": round(1e6 * cpu / calls, 1),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.tracing_overhead")
    p.add_argument("--calls", type=int, default=3000)
    p.add_argument("--rounds", type=int, default=3, help="each mode this many times, interleaved")
    p.add_argument("--mode", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.mode:
        print(json.dumps(asyncio.run(_run(args.mode, args.calls))))
        return
    results: dict[str, list[dict[str, Any]]] = {"off": [], "ours": [], "otel": []}
    for _ in range(args.rounds):
        for mode in results:
            out = subprocess.run(
                [sys.executable, "-m", "bench.tracing_overhead", "--mode", mode, "--calls", str(args.calls)],
                capture_output=True,
                text=True,
                check=True,
            )
            results[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'mode':6} {'p50 us':>8} {'p95 us':>8} {'cpu us/call':>12}   (median of {args.rounds} runs)")
    for mode, runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in ("p50_us", "p95_us", "cpu_us_per_call")}
        print(f"{mode:6} {med['p50_us']:8.1f} {med['p95_us']:8.1f} {med['cpu_us_per_call']:12.1f}")


if __name__ == "__main__":
    main()
