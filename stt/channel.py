"""Client channels of the SDK: TLS when asked for, keepalive aligned with the servers, message sizes,
and a retry policy for UNAVAILABLE only. Deadlines on every call are the caller's job.

TLS: `tls=True` uses the system's roots; `ca=FILE` trusts that CA (and implies TLS); `cert` + `key`
present a client certificate (mTLS); `server_name` is the name the server's certificate must carry
when the address does not (an IP, or a list of gateways). Each falls back to its environment
variable: STT_TLS (1/true), STT_TLS_CA_FILE, STT_TLS_CERT_FILE, STT_TLS_KEY_FILE,
STT_TLS_SERVER_NAME. `tls=False` means plaintext whatever the environment says.
"""

from __future__ import annotations

import json
import os
from typing import Any

import grpc

DEFAULT_SERVER = "localhost:50051"
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
    services: list[str], *, max_message_bytes: int = MAX_MESSAGE_BYTES, load_balancing: str | None = None
) -> list[tuple[str, Any]]:
    return [
        ("grpc.service_config", service_config(services, load_balancing=load_balancing)),
        ("grpc.enable_retries", 1),
        # Retries replay the request: buffer large uploads so they can be retried.
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
    """host:port -> dns:///host:port so the channel re-resolves (e.g. several gateway addresses)."""
    address = address.strip()
    if "://" in address or address.startswith(("ipv4:", "ipv6:", "unix:", "dns:")):
        return address
    return f"dns:///{address}"


def _list_host(target: str) -> str | None:
    """For an `ipv4:a:p,b:p` / `ipv6:[a]:p,...` list of gateways, the host the certificates are
    checked against (the first one's), since gRPC would check the whole list as one name."""
    for scheme in ("ipv4:", "ipv6:"):
        if target.startswith(scheme):
            first = target[len(scheme) :].split(",")[0].lstrip("/")
            host = first.rsplit(":", 1)[0] if first.count(":") == 1 or first.startswith("[") else first
            return host.strip("[]") or None
    return None


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _read(path: str | None) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as fh:
        return fh.read()


def credentials(
    *, tls: bool | None = None, ca: str | None = None, cert: str | None = None, key: str | None = None
) -> grpc.ChannelCredentials | None:
    """TLS credentials from the arguments or STT_TLS_* (None: plaintext)."""
    if tls is False:
        return None
    ca = ca or os.environ.get("STT_TLS_CA_FILE") or None
    cert = cert or os.environ.get("STT_TLS_CERT_FILE") or None
    key = key or os.environ.get("STT_TLS_KEY_FILE") or None
    use_tls = tls if tls is not None else (_env_flag("STT_TLS") or bool(ca or cert))
    if not use_tls:
        return None
    if bool(cert) != bool(key):
        raise ValueError("a client certificate needs both tls_cert and tls_key")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca), private_key=_read(key), certificate_chain=_read(cert)
    )


def secure_or_insecure_channel(
    address: str,
    services: list[str],
    *,
    tls: bool | None = None,
    ca: str | None = None,
    cert: str | None = None,
    key: str | None = None,
    server_name: str | None = None,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
) -> grpc.aio.Channel:
    options = channel_options(services, max_message_bytes=max_message_bytes, load_balancing="round_robin")
    creds = credentials(tls=tls, ca=ca, cert=cert, key=key)
    target = normalize_target(address)
    if creds is None:
        return grpc.aio.insecure_channel(target, options=options)
    server_name = server_name or os.environ.get("STT_TLS_SERVER_NAME") or _list_host(target)
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.aio.secure_channel(target, creds, options=options)
