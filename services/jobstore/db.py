"""Async engine and sessions for PostgreSQL (asyncpg) and SQLite (aiosqlite)."""

from __future__ import annotations

import os
import ssl
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.ext.asyncio import AsyncSession as AsyncSession


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


LIBPQ_SSL = ("sslmode", "sslrootcert", "sslcert", "sslkey")


def postgres_ssl(url: str) -> tuple[str, ssl.SSLContext | str | bool | None]:
    """libpq's TLS parameters (`?sslmode=verify-full&sslrootcert=ca.pem&sslcert=...&sslkey=...`)
    taken out of the URL and turned into asyncpg's `ssl` argument (asyncpg does not read them
    from a SQLAlchemy URL). Modes as in libpq: disable, allow, prefer, require (encrypted, server
    not verified unless sslrootcert is given), verify-ca, verify-full."""
    u = make_url(url)
    params = {k: u.query[k] for k in LIBPQ_SSL if k in u.query}
    if not params:
        return url, None
    clean = u.difference_update_query(list(params)).render_as_string(hide_password=False)

    def one(key: str) -> str | None:
        value = params.get(key)
        return value[0] if isinstance(value, tuple) else value

    mode, root, cert, key = one("sslmode") or "prefer", one("sslrootcert"), one("sslcert"), one("sslkey")
    if mode == "disable":
        return clean, False
    if mode in ("allow", "prefer") and not (root or cert):
        return clean, mode
    ctx = ssl.create_default_context(cafile=root) if root else ssl.create_default_context()
    if mode in ("allow", "prefer", "require") and not root:
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    elif mode in ("require", "verify-ca"):
        ctx.check_hostname = False  # verify the chain, not the name
    elif mode != "verify-full" and mode not in ("allow", "prefer"):
        raise ValueError(f"unknown sslmode {mode!r} in the database URL")
    if cert:
        ctx.load_cert_chain(cert, key)
    return clean, ctx


def create_engine(url: str, *, pool_size: int = 10) -> AsyncEngine:
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if is_sqlite(url):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        kwargs = {"connect_args": {"timeout": 30}}
    else:
        kwargs.update(pool_size=pool_size, max_overflow=pool_size, pool_recycle=1800)
        url, tls = postgres_ssl(url)
        if tls is not None:
            kwargs["connect_args"] = {"ssl": tls}
    engine = create_async_engine(url, **kwargs)
    if is_sqlite(url):

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # We issue BEGIN ourselves (below) instead of the driver's deferred transactions.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @event.listens_for(engine.sync_engine, "begin")
        def _begin_immediate(conn: Any) -> None:
            # Take the write lock up front: a deferred transaction that reads and then writes can
            # fail with SQLITE_BUSY under WAL when another connection wrote in between.
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)
