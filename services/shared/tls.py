"""TLS for every hop: server credentials that follow certificate rotation, and mTLS client
credentials for the channels between services.

Servers serve TLS when STT_TLS_CERT_FILE and STT_TLS_KEY_FILE are set, and require a client
certificate signed by STT_TLS_CLIENT_CA_FILE when that is set. The files are re-read when they
change (checked at each new TLS handshake), so a certificate renewed by cert-manager (or any tool
that replaces the files) is served to new connections without a restart.

Clients (the gateway's channels to transcribers and the jobstore) trust STT_TLS_CA_FILE (default:
the client CA) and present the service's own certificate, which makes the hop mutual TLS.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass

import grpc

log = logging.getLogger("tls")


def _read(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def _stamp(paths: tuple[str, ...]) -> tuple[tuple[int, int], ...]:
    out = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append((st.st_mtime_ns, st.st_size))
        except OSError:
            out.append((0, 0))
    return tuple(out)


@dataclass(frozen=True)
class TlsFiles:
    """Where a process finds its certificate, key and CAs (None: not configured)."""

    cert: str | None = None
    key: str | None = None
    client_ca: str | None = None  # servers: require client certificates signed by this CA
    ca: str | None = None  # clients: trust servers signed by this CA (default: client_ca)

    @property
    def enabled(self) -> bool:
        return bool(self.cert and self.key)

    @property
    def mutual(self) -> bool:
        return self.enabled and bool(self.client_ca)

    @property
    def trust(self) -> str | None:
        return self.ca or self.client_ca

    def check(self) -> None:
        """Refuse half a configuration, and files that cannot be read, at start."""
        if bool(self.cert) != bool(self.key):
            raise ValueError("TLS needs both STT_TLS_CERT_FILE and STT_TLS_KEY_FILE")
        if self.client_ca and not self.enabled:
            raise ValueError("STT_TLS_CLIENT_CA_FILE needs STT_TLS_CERT_FILE and STT_TLS_KEY_FILE")
        for path in (self.cert, self.key, self.client_ca, self.ca):
            if path and not os.access(path, os.R_OK):
                raise ValueError(f"TLS file {path} cannot be read")


class ReloadingServerCredentials:
    """grpc dynamic server credentials whose fetcher re-reads the files when they change."""

    def __init__(self, files: TlsFiles) -> None:
        assert files.enabled
        self.files = files
        self.paths = tuple(p for p in (files.cert, files.key, files.client_ca) if p)
        self._lock = threading.Lock()
        self._stamp = _stamp(self.paths)
        self.reloads = 0
        self.credentials = grpc.dynamic_ssl_server_credentials(
            self._config(),
            self._fetch,
            require_client_authentication=bool(files.client_ca),
        )

    def _config(self) -> grpc.ServerCertificateConfiguration:
        f = self.files
        assert f.cert and f.key
        return grpc.ssl_server_certificate_configuration(
            [(_read(f.key), _read(f.cert))],
            root_certificates=_read(f.client_ca) if f.client_ca else None,
        )

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by gRPC at each handshake: a new configuration if the files changed, else None."""
        with self._lock:
            stamp = _stamp(self.paths)
            if stamp == self._stamp:
                return None
            try:
                config = self._config()
            except Exception as exc:  # mid-rotation (key written, cert not yet): keep the old pair
                log.warning("TLS files changed but could not be loaded yet: %s", exc)
                return None
            self._stamp = stamp
            self.reloads += 1
            log.info("TLS certificate reloaded", extra={"cert": self.files.cert})
            return config


class ClientTls:
    """mTLS credentials for channels to other services, rebuilt when the files change."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self.paths = tuple(p for p in (files.cert, files.key, files.trust) if p)
        self._stamp = _stamp(self.paths)

    def credentials(self) -> grpc.ChannelCredentials:
        f = self.files
        return grpc.ssl_channel_credentials(
            root_certificates=_read(f.trust) if f.trust else None,
            private_key=_read(f.key) if f.key else None,
            certificate_chain=_read(f.cert) if f.cert else None,
        )

    def changed(self) -> bool:
        """True once after the files changed (the caller rebuilds its channels)."""
        stamp = _stamp(self.paths)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        return True


def peer_identities(auth_context: dict[str, list[bytes]]) -> set[str]:
    """The names a verified client certificate carries (SAN DNS/IP/URI entries and the CN)."""
    names: set[str] = set()
    for key in ("x509_subject_alternative_name", "x509_common_name"):
        for value in auth_context.get(key, ()):
            names.add(value.decode(errors="replace") if isinstance(value, bytes) else str(value))
    return names


def is_tls(auth_context: dict[str, list[bytes]]) -> bool:
    return b"ssl" in auth_context.get("transport_security_type", ())
