"""Client channels between services (gateway -> transcribers, gateway -> jobstore).

Deadlines on every call are the caller's job; this module sets keepalive (aligned with the servers,
which accept pings every 10 s), message sizes, and a retry policy for UNAVAILABLE only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import grpc

from services.shared.security import SERVICE_TOKEN_HEADER
from services.shared.tls import ClientTls, TlsFiles

MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def service_config(services: list[str], *, max_attempts: int = 5, load_balancing: str | None = None) -> str:
    """Retry UNAVAILABLE only (max_attempts < 2: no retry policy, the caller retries itself)."""
    method: dict[str, Any] = {"name": [{"service": s} for s in services], "waitForReady": False}
    if max_attempts >= 2:
        method["retryPolicy"] = {
            "maxAttempts": min(max_attempts, 5),
            "initialBackoff": "0.2s",
            "maxBackoff": "3s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        }
    config: dict[str, Any] = {"methodConfig": [method]}
    if load_balancing:
        config["loadBalancingConfig"] = [{load_balancing: {}}]
    return json.dumps(config)


def channel_options(
    services: list[str],
    *,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
    load_balancing: str | None = None,
    max_attempts: int = 5,
) -> list[tuple[str, Any]]:
    return [
        (
            "grpc.service_config",
            service_config(services, max_attempts=max_attempts, load_balancing=load_balancing),
        ),
        ("grpc.enable_retries", 1),
        # Retries replay the request: buffer large messages so they can be retried.
        ("grpc.per_rpc_retry_buffer_size", max_message_bytes),
        ("grpc.retry_buffer_size", 4 * max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 5_000),
        ("grpc.min_reconnect_backoff_ms", 200),
    ]


def normalize_target(address: str) -> str:
    """host:port -> dns:///host:port so the channel re-resolves (headless Services)."""
    address = address.strip()
    if "://" in address or address.startswith(("ipv4:", "ipv6:", "unix:", "dns:")):
        return address
    return f"dns:///{address}"


@dataclass
class InternalCredentials:
    """How this process authenticates to the internal services: mTLS (its own certificate, and the
    CA the servers' certificates must chain to) and/or the shared service token."""

    tls: ClientTls | None = None
    token: str = ""
    metadata: tuple[tuple[str, str], ...] = field(init=False)

    def __post_init__(self) -> None:
        self.metadata = ((SERVICE_TOKEN_HEADER, self.token),) if self.token else ()

    @classmethod
    def from_settings(cls, settings: Any) -> InternalCredentials:
        files: TlsFiles = settings.tls()
        return cls(ClientTls(files) if files.enabled or files.trust else None, settings.token())


def internal_channel(
    address: str,
    services: list[str],
    *,
    load_balancing: str | None = "round_robin",
    max_message_bytes: int = MAX_MESSAGE_BYTES,
    max_attempts: int = 5,
    creds: InternalCredentials | None = None,
    server_name: str | None = None,
) -> grpc.aio.Channel:
    """A channel to an internal service; TLS (mutual when this process has a certificate) when
    `creds` has TLS. `server_name`: the name the server's certificate must carry, when the address
    is an IP (a pod behind a headless Service)."""
    options = channel_options(
        services,
        max_message_bytes=max_message_bytes,
        load_balancing=load_balancing,
        max_attempts=max_attempts,
    )
    target = normalize_target(address)
    if creds is None or creds.tls is None:
        return grpc.aio.insecure_channel(target, options=options)
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.aio.secure_channel(target, creds.tls.credentials(), options=options)
