"""python -m services.gateway [--port N] [--port-file PATH]"""

from __future__ import annotations

import argparse
import asyncio

from services.gateway.config import GatewaySettings
from services.gateway.server import create_server
from services.shared import metrics
from services.shared.logging import setup_logging
from services.shared.server import run_until_signalled, write_port_file


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m services.gateway")
    parser.add_argument("--port", type=int, default=None, help="listen port (default STT_GATEWAY_PORT)")
    parser.add_argument("--port-file", default=None, help="write the bound port here once listening")
    args = parser.parse_args(argv)
    settings = GatewaySettings()
    setup_logging(settings.log_level, settings.log_format)
    settings.log_effective("gateway")
    metrics.serve_metrics(settings.metrics_port, settings.host)
    gateway = await create_server(settings, port=args.port)
    write_port_file(args.port_file, gateway.port)
    await run_until_signalled([gateway.running])


if __name__ == "__main__":
    asyncio.run(main())
