"""Prometheus metrics shared by all services, served over HTTP when STT_METRICS_PORT is set."""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RPC_TOTAL = Counter("stt_rpc_total", "RPCs handled, by method and status code", ["method", "code"])
RPC_SECONDS = Histogram(
    "stt_rpc_seconds",
    "RPC handling time",
    ["method"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
RPC_IN_FLIGHT = Gauge("stt_rpc_in_flight", "RPCs in progress", ["method"])
# The gateway's view of its transcriber pool (what the "no transcriber serving" alert watches).
TRANSCRIBERS = Gauge(
    "stt_gateway_transcribers", "Transcriber endpoints this gateway knows, by readiness", ["state"]
)
DECODE_REJECTIONS = Counter(
    "stt_decode_rejections_total",
    "Audio refused while checking or decoding it (recordings, job uploads, streams), by error reason",
    ["reason"],
)

_started: set[int] = set()


def serve_metrics(port: int, host: str = "0.0.0.0") -> None:
    """Start the /metrics HTTP endpoint once per port (0 disables it)."""
    if port <= 0 or port in _started:
        return
    start_http_server(port, addr=host)
    _started.add(port)
    logging.getLogger("metrics").info("metrics on http://%s:%d/metrics", host, port)
