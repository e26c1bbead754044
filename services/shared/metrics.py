"""Prometheus metrics shared by all services, served over HTTP when STT_METRICS_PORT is set.

Each service defines its own next to the code that records them (transcriber/batcher.py,
gateway/observe.py, gateway/dispatcher.py, jobstore/metrics.py, ...); docs/operations.md lists every
one (tests/test_observability.py checks the list against what /metrics serves). Labels are bounded
sets only (method, code, reason, state, priority, work class): never job ids, request ids or tenants
beyond the configured ones (see bounded_tenant).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics, start_http_server

# No `*_created` series next to every counter and histogram: they double the series for nothing.
disable_created_metrics()

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
_tenants: frozenset[str] = frozenset()


def set_known_tenants(tenants: Iterable[str]) -> None:
    """The configured tenants (from the API keys): the only tenant label values metrics may use."""
    global _tenants
    _tenants = frozenset(tenants)


def bounded_tenant(tenant: str) -> str:
    """A tenant as a label value: configured tenants by name, anything else as "other", so a metric
    labelled by tenant stays bounded (for per-tenant usage next to quotas)."""
    return tenant if tenant in _tenants else "other"


def serve_metrics(port: int, host: str = "0.0.0.0") -> None:
    """Start the /metrics HTTP endpoint once per port (0 disables it)."""
    if port <= 0 or port in _started:
        return
    start_http_server(port, addr=host)
    _started.add(port)
    logging.getLogger("metrics").info("metrics on http://%s:%d/metrics", host, port)
