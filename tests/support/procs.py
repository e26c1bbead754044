"""Real service processes for system tests (the same runner `make cluster` uses)."""

from __future__ import annotations

from typing import Any

from services.cluster import ROOT, free_port
from services.cluster import ServiceProcess as _ServiceProcess

__all__ = ["ROOT", "ServiceProcess", "free_port"]


class ServiceProcess(_ServiceProcess):
    """Logs at INFO (the tests read them), whatever the test process itself logs at."""

    def __init__(self, name: str, *, env: dict[str, str] | None = None, **kw: Any) -> None:
        super().__init__(name, env={"STT_LOG_LEVEL": "INFO", **(env or {})}, **kw)
