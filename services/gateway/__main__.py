"""python -m services.gateway [--port N] [--port-file PATH]"""

from __future__ import annotations

import asyncio

from services.gateway.config import GatewaySettings
from services.gateway.server import create_server
from services.shared.main import serve_main


def main(argv: list[str] | None = None) -> None:
    asyncio.run(serve_main("gateway", GatewaySettings, create_server, argv))


if __name__ == "__main__":
    main()
