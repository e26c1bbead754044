"""python -m services.transcriber [--port N] [--port-file PATH]"""

from __future__ import annotations

import argparse
import asyncio

from services.shared import metrics
from services.shared.logging import setup_logging
from services.shared.server import run_until_signalled, write_port_file
from services.transcriber.config import TranscriberSettings
from services.transcriber.server import create_server


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m services.transcriber")
    parser.add_argument("--port", type=int, default=None, help="listen port (default STT_TRANSCRIBER_PORT)")
    parser.add_argument("--port-file", default=None, help="write the bound port here once listening")
    args = parser.parse_args(argv)
    settings = TranscriberSettings()
    setup_logging(settings.log_level, settings.log_format)
    settings.log_effective("transcriber")
    metrics.serve_metrics(settings.metrics_port, settings.host)
    app = await create_server(settings, port=args.port)
    write_port_file(args.port_file, app.port)
    await run_until_signalled([app.running])


if __name__ == "__main__":
    asyncio.run(main())
