"""Settings base: environment variables with the STT_ prefix and an optional .env file."""

from __future__ import annotations

import json
import logging
from typing import Any, Literal

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.shared.tls import TlsFiles

SECRET_HINTS = ("password", "secret", "token", "key")


class CommonSettings(BaseSettings):
    """Settings every service shares. Each service subclasses this with its own fields."""

    model_config = SettingsConfigDict(env_prefix="STT_", env_file=".env", extra="ignore")

    host: str = "0.0.0.0"
    log_level: str = "INFO"
    log_format: Literal["console", "json"] = "console"
    # Seconds a SIGTERM'd server waits for in-flight calls before cancelling them.
    shutdown_grace_seconds: float = 10.0
    # Port for Prometheus metrics over HTTP; 0 disables the endpoint.
    metrics_port: int = 0
    # OpenTelemetry traces over OTLP (also on when OTEL_EXPORTER_OTLP_ENDPOINT is set; see tracing.py).
    tracing: bool = False
    # Server-side keepalive and connection ageing (so new pods behind a Service get traffic): after
    # max_connection_age the server sends GOAWAY and new calls use a new connection; calls still
    # running get max_connection_age_grace more, 0 meaning until they end (live streams are never
    # cut by ageing; a grace > 0 cuts them, and SDK streams then resume).
    keepalive_time_seconds: float = 30.0
    keepalive_timeout_seconds: float = 10.0
    max_connection_age_seconds: float = 300.0
    max_connection_age_grace_seconds: float = 0.0
    # HTTP/2 streams (calls) one client connection may have open at once.
    max_concurrent_streams: int = 100

    # -- security (README "Security") ----------------------------------------------------------
    # Serve TLS with this certificate and key (PEM); files are re-read when they change.
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    # Require client certificates signed by this CA (mutual TLS).
    tls_client_ca_file: str | None = None
    # CA that servers this process calls must be signed by (default: tls_client_ca_file). The
    # process's own certificate is presented as its client certificate (mTLS between services).
    tls_ca_file: str | None = None
    # Shared secret of the internal hops: the gateway sends it, transcriber and jobstore require it.
    service_token: SecretStr | None = None
    # Internal services: client certificate names (SAN or CN) allowed to call when mTLS is on.
    allowed_clients: str = "gateway"
    # Serve without authentication on a non-loopback address (refused otherwise); warned about.
    allow_anonymous: bool = False
    # Offer server reflection (grpcurl and other tools list the services).
    reflection: bool = True
    # A plaintext port serving only grpc.health.v1 (for kubelet probes, which cannot do mTLS); 0: off.
    health_port: int = 0

    def tls(self) -> TlsFiles:
        return TlsFiles(
            cert=self.tls_cert_file or None,
            key=self.tls_key_file or None,
            client_ca=self.tls_client_ca_file or None,
            ca=self.tls_ca_file or None,
        )

    def token(self) -> str:
        return self.service_token.get_secret_value() if self.service_token else ""

    def effective(self) -> dict[str, Any]:
        """The settings as printed at start, secrets masked."""
        out: dict[str, Any] = {}
        for name, value in self.model_dump().items():
            if name.endswith("_file"):
                out[name] = value  # a path, not a secret
            elif isinstance(getattr(self, name), SecretStr) or (
                any(h in name for h in SECRET_HINTS) and value not in (None, "")
            ):
                out[name] = "***"
            elif isinstance(value, str) and "://" in value and "@" in value:
                out[name] = _mask_url(value)
            else:
                out[name] = value
        return out

    def log_effective(self, service: str) -> None:
        logging.getLogger(service).info(
            "effective config", extra={"config": json.loads(json.dumps(self.effective(), default=str))}
        )


def _mask_url(url: str) -> str:
    """postgresql://user:pass@host/db -> postgresql://user:***@host/db"""
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"
