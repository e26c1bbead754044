"""python -m services.jobstore [--port N] [--port-file PATH]    serve
python -m services.jobstore migrate                          upgrade the database schema and exit"""

from __future__ import annotations

import argparse
import asyncio

from services.jobstore import db, migrate
from services.jobstore.config import JobstoreSettings
from services.jobstore.server import create_server
from services.shared import metrics
from services.shared.logging import setup_logging
from services.shared.server import run_until_signalled, write_port_file


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m services.jobstore")
    parser.add_argument("command", nargs="?", choices=["serve", "migrate"], default="serve")
    parser.add_argument("--port", type=int, default=None, help="listen port (default STT_JOBSTORE_PORT)")
    parser.add_argument("--port-file", default=None, help="write the bound port here once listening")
    args = parser.parse_args(argv)
    settings = JobstoreSettings()
    setup_logging(settings.log_level, settings.log_format)
    settings.log_effective("jobstore")
    if args.command == "migrate":
        engine = db.create_engine(settings.db_url())
        await migrate.upgrade(engine)
        await engine.dispose()
        return
    metrics.serve_metrics(settings.metrics_port, settings.host)
    app = await create_server(settings, port=args.port)
    write_port_file(args.port_file, app.port)
    await run_until_signalled([app.running])


if __name__ == "__main__":
    asyncio.run(main())
