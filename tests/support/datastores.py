"""Real PostgreSQL and Redis for tests: a fresh database / key prefix per use, removed afterwards."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

PG_HOST = os.environ.get("STT_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("STT_TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("STT_TEST_PG_USER", "postgres")
REDIS_URL = os.environ.get("STT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@asynccontextmanager
async def postgres_database() -> AsyncIterator[str]:
    """CREATE a uniquely named database; yield its SQLAlchemy URL; DROP it."""
    name = f"stt_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database="postgres")
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield f"postgresql+asyncpg://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        admin = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database="postgres")
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@asynccontextmanager
async def redis_prefix() -> AsyncIterator[str]:
    """A unique key prefix; keys under it are deleted afterwards."""
    import redis.asyncio as aioredis

    prefix = f"stt-test-{uuid.uuid4().hex[:10]}"
    yield prefix
    r = aioredis.from_url(REDIS_URL)
    try:
        async for key in r.scan_iter(f"{prefix}:*"):
            await r.delete(key)
    finally:
        await r.aclose()
