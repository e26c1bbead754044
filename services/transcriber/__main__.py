"""python -m services.transcriber [--port N] [--port-file PATH]"""

from __future__ import annotations

import asyncio

from services.shared.main import serve_main
from services.transcriber.config import TranscriberSettings
from services.transcriber.server import create_server


def main(argv: list[str] | None = None) -> None:
    asyncio.run(serve_main("transcriber", TranscriberSettings, create_server, argv))


if __name__ == "__main__":
    main()
