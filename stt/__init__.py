"""stt: Python SDK and CLI for the speech-to-text platform (gRPC API stt.v1)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["AsyncClient", "Client", "SttError"]

if TYPE_CHECKING:
    from stt.client import AsyncClient, Client
    from stt.errors import SttError


def __getattr__(name: str) -> Any:
    # Lazy, so `stt.v1` (generated stubs) can be imported without the client machinery.
    if name in ("AsyncClient", "Client"):
        from stt import client

        return getattr(client, name)
    if name == "SttError":
        from stt.errors import SttError

        return SttError
    raise AttributeError(name)
