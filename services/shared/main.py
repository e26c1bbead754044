"""The shared `python -m services.<name>` entry point: flags, settings, logging, metrics, serve
until SIGTERM/SIGINT (then drain)."""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from services.shared import metrics, tracing
from services.shared.config import CommonSettings
from services.shared.logging import setup_logging
from services.shared.server import RunningServer, run_until_signalled, write_port_file

S = TypeVar("S", bound=CommonSettings)


class App(Protocol):
    running: RunningServer

    @property
    def port(self) -> int: ...


async def serve_main(
    name: str,
    settings_cls: Callable[[], S],
    create: Callable[..., Awaitable[Any]],
    argv: list[str] | None = None,
    *,
    commands: dict[str, Callable[[S], Awaitable[None]]] | None = None,
) -> None:
    """Parse `[COMMAND] [--port N] [--port-file PATH]`, then serve (or run COMMAND and exit)."""
    parser = argparse.ArgumentParser(prog=f"python -m services.{name}")
    if commands:
        parser.add_argument("command", nargs="?", choices=["serve", *commands], default="serve")
    parser.add_argument(
        "--port", type=int, default=None, help=f"listen port (default STT_{name.upper()}_PORT)"
    )
    parser.add_argument("--port-file", default=None, help="write the bound port here once listening")
    args = parser.parse_args(argv)
    settings = settings_cls()
    setup_logging(settings.log_level, settings.log_format)
    settings.log_effective(name)
    command = getattr(args, "command", "serve")
    if commands and command != "serve":
        await commands[command](settings)
        return
    metrics.serve_metrics(settings.metrics_port, settings.host)
    tracing.configure(name, settings.tracing)
    try:
        app: App = await create(settings, port=args.port)
        http_port = getattr(app, "http_port", None)
        if args.port_file and http_port is not None:
            # The gateway's HTTP front door; written first, so it is there once the port file is.
            write_port_file(f"{args.port_file}.http", http_port)
        write_port_file(args.port_file, app.port)
        await run_until_signalled([app.running])
    finally:
        tracing.shutdown()  # export the spans still buffered
