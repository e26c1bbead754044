"""API-key authentication, for every door of the gateway (gRPC here, HTTP in the front door).

`Authenticator.authenticate(token)` turns a presented key into a `Caller` (tenant, key id,
read-only) or raises Unauthenticated. A door authenticates each request and runs the domain call
under `use_caller(caller)` (the gRPC interceptor below does it from `authorization: Bearer <key>`
or `x-api-key`); the domain layer reads it with `current_caller()`.

STT_API_KEYS is a comma-separated list of entries, each `KEY:TENANT[:ro]` or
`sha256:HEX:TENANT[:ro]` (the key's SHA-256 in hex, so the configuration need not hold the
secret). A tenant may have several keys (rotation); `:ro` makes a key read-only. With no keys
every caller is tenant "default" — allowed only on loopback or with STT_ALLOW_ANONYMOUS=true
(services.shared.security.check_exposure). Health and reflection stay open.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import hmac
import re
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from services.shared.context import audit
from services.shared.errors import PermissionDenied, Unauthenticated
from services.shared.security import guarded

_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
DEFAULT_TENANT = "default"
MAX_TENANT_CHARS = 128


@dataclass(frozen=True)
class Caller:
    tenant: str
    key_id: str = ""  # never the key itself
    read_only: bool = False


ANONYMOUS = Caller(DEFAULT_TENANT)
# Stands for a caller whose credentials were refused, until its call is aborted.
DENIED = Caller("", read_only=True)
caller_var: contextvars.ContextVar[Caller] = contextvars.ContextVar("caller", default=ANONYMOUS)

_OPEN = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def current_caller() -> Caller:
    return caller_var.get()


def current_tenant() -> str:
    return caller_var.get().tenant


@contextlib.contextmanager
def use_caller(caller: Caller) -> Iterator[Caller]:
    """Run the domain calls inside this block as `caller` (for doors other than gRPC)."""
    token = caller_var.set(caller)
    try:
        yield caller
    finally:
        caller_var.reset(token)


def require_write(caller: Caller | None = None) -> Caller:
    """Refuse a call that changes something (or costs compute) to a read-only key."""
    caller = caller or current_caller()
    if caller.read_only:
        raise PermissionDenied(
            f"API key {caller.key_id} is read-only: it may get, list and watch jobs and fetch "
            "transcripts, not create, change or transcribe",
            reason="READ_ONLY_KEY",
        )
    return caller


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_id(key: str) -> str:
    """A stable, non-secret id of a key for logs (the first 12 hex digits of its sha256)."""
    return key_hash(key)[:12]


@dataclass(frozen=True)
class KeyEntry:
    digest: bytes  # sha256 of the key
    caller: Caller


def parse_keys(raw: str) -> list[KeyEntry]:
    """STT_API_KEYS entries (see the module doc). Raises ValueError naming the bad entry."""
    out: list[KeyEntry] = []
    for n, item in enumerate(raw.split(","), 1):
        item = item.strip()
        if not item:
            continue
        parts = item.split(":")
        read_only = parts[-1].lower() == "ro" and len(parts) >= 3
        if read_only:
            parts = parts[:-1]
        if parts[0].lower() == "sha256" and len(parts) >= 2:
            if not _HEX64.match(parts[1]):
                raise ValueError(f"STT_API_KEYS entry {n}: sha256: needs 64 hex digits")
            digest, tenant = parts[1].lower(), ":".join(parts[2:])
        else:
            digest, tenant = key_hash(parts[0]), ":".join(parts[1:])
        tenant = tenant or DEFAULT_TENANT
        if not parts[0] or len(tenant) > MAX_TENANT_CHARS:
            raise ValueError(f"STT_API_KEYS entry {n} is not KEY:TENANT[:ro] or sha256:HEX:TENANT[:ro]")
        out.append(KeyEntry(bytes.fromhex(digest), Caller(tenant, digest[:12], read_only)))
    return out


class Authenticator:
    """Keys -> callers. No keys: no authentication (every caller is tenant "default")."""

    def __init__(self, keys: dict[str, str] | list[KeyEntry] | str) -> None:
        if isinstance(keys, str):
            entries = parse_keys(keys)
        elif isinstance(keys, dict):
            entries = [
                KeyEntry(hashlib.sha256(k.encode()).digest(), Caller(t, key_id(k))) for k, t in keys.items()
            ]
        else:
            entries = list(keys)
        self.entries = entries

    @property
    def enabled(self) -> bool:
        return bool(self.entries)

    @property
    def tenants(self) -> set[str]:
        return {e.caller.tenant for e in self.entries}

    def authenticate(self, token: str | None) -> Caller:
        if not self.enabled:
            return ANONYMOUS
        presented = (token or "").strip()
        digest = hashlib.sha256(presented.encode()).digest()
        found = None
        for entry in self.entries:  # compare with every key: no timing hint of which matched
            if hmac.compare_digest(entry.digest, digest):
                found = entry.caller
        if found is None or not presented:
            raise Unauthenticated(
                "missing or invalid API key: send 'authorization: Bearer <key>'", reason="UNAUTHENTICATED"
            )
        return found


def token_from_metadata(metadata: Any) -> str:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.lower().startswith("bearer "):
            return value[7:].strip()
        if key == "x-api-key" and isinstance(value, str):
            return value.strip()
    return ""


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates every call but health and reflection and runs it as the caller."""

    def __init__(self, authenticator: Authenticator) -> None:
        self.auth = authenticator

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if details.method.startswith(_OPEN):
            return await continuation(details)
        # Authenticate before the inner interceptors run (they may reserve memory for the body).
        try:
            caller: Caller = self.auth.authenticate(token_from_metadata(details.invocation_metadata))
            err: Unauthenticated | None = None
        except Unauthenticated as exc:
            caller, err = DENIED, exc
        caller_var.set(caller)
        handler = await continuation(details)
        if handler is None:
            return handler
        if err is not None:
            failure = err

            def deny(context: grpc.aio.ServicerContext) -> None:
                raise failure

            return guarded(handler, deny)

        def bind(context: grpc.aio.ServicerContext) -> None:
            caller_var.set(caller)
            record = audit()
            record.tenant, record.key_id = caller.tenant, caller.key_id

        return guarded(handler, bind)
