"""python -m services.jobstore [serve] [--port N] [--port-file PATH]
python -m services.jobstore migrate      upgrade the database schema and exit"""

from __future__ import annotations

import asyncio

from services.jobstore import db, migrate
from services.jobstore.config import JobstoreSettings
from services.jobstore.server import create_server
from services.shared.main import serve_main


async def run_migrations(settings: JobstoreSettings) -> None:
    engine = db.create_engine(settings.db_url())
    try:
        await migrate.upgrade(engine)
    finally:
        await engine.dispose()


def main(argv: list[str] | None = None) -> None:
    asyncio.run(
        serve_main("jobstore", JobstoreSettings, create_server, argv, commands={"migrate": run_migrations})
    )


if __name__ == "__main__":
    main()
