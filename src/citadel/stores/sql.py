"""SQL plumbing every part shares: the async engine for a URI and the one translation of driver
errors. PostgreSQL through asyncpg in production, SQLite through aiosqlite embedded.

``translate_errors`` turns every driver or connection error into ``StoreUnavailable("sql", ...)``
and a constraint violation into ``Conflict``; the parts (accounts, the ledger, migrations) wrap
their statements in it, so no driver exception escapes a store.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from sqlalchemy import event, exc
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from citadel.errors import ConfigError, Conflict, StoreUnavailable

__all__ = ["DEFAULT_TIMEOUT", "build_engine", "database_url", "translate_errors"]

DEFAULT_TIMEOUT = 5.0  # seconds for one operation, connecting included


def database_url(uri: str) -> str:
    """The SQLAlchemy async URL for ``uri``: PostgreSQL through asyncpg, SQLite through aiosqlite.

    ``postgresql://`` and ``postgres://`` become ``postgresql+asyncpg://`` (libpq's ``sslmode``
    query parameter becoming asyncpg's ``ssl``); ``sqlite:///path`` becomes
    ``sqlite+aiosqlite:///path``; URLs naming those drivers already are returned as given.
    """
    scheme, sep, rest = uri.strip().partition("://")
    scheme = scheme.lower()
    if not sep:
        raise ConfigError("accounts.database", uri, "a postgresql:// or sqlite:/// URI")
    if scheme in ("postgresql", "postgres", "postgresql+asyncpg"):
        parts = urlsplit(f"postgresql+asyncpg://{rest}")
        query = [("ssl" if k == "sslmode" else k, v) for k, v in parse_qsl(parts.query)]
        return urlunsplit(parts._replace(query=urlencode(query)))
    if scheme in ("sqlite", "sqlite+aiosqlite"):
        return f"sqlite+aiosqlite://{rest}"
    raise ConfigError(
        "accounts.database", uri, "a postgresql:// or sqlite:/// URI (asyncpg or aiosqlite)"
    )


def build_engine(uri: str, *, operation_timeout: float = DEFAULT_TIMEOUT) -> AsyncEngine:
    """An engine for ``uri``; nothing is connected until first used.

    SQLite connections enforce foreign keys and use write-ahead logging (readers never wait for
    the writer); ``operation_timeout`` bounds connecting to PostgreSQL and SQLite's lock waits.
    """
    url = database_url(uri)
    if url.startswith("sqlite"):
        engine = create_async_engine(url, connect_args={"timeout": operation_timeout})
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    return create_async_engine(
        url, connect_args={"timeout": operation_timeout}, pool_timeout=operation_timeout
    )


def _sqlite_pragmas(dbapi_connection: Any, connection_record: object) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA journal_mode")
        row = cursor.fetchone()
        if row is None or str(row[0]).lower() != "wal":
            # Switching to WAL needs the database to itself; the mode is kept in the file, so
            # when another connection holds a lock now, a later connection makes the switch.
            with contextlib.suppress(Exception):
                cursor.execute("PRAGMA journal_mode=WAL")
    finally:
        cursor.close()


def _missing_table(detail: str) -> bool:
    """Whether a driver's message says a table or column is missing (SQLite's or PostgreSQL's
    words): the schema is older than this code."""
    if "no such table" in detail or "no such column" in detail:
        return True
    return detail.startswith(("relation ", "column ")) and detail.endswith("does not exist")


@contextlib.contextmanager
def translate_errors(timeout: float | None = None) -> Iterator[None]:
    """Turn a driver or connection failure into StoreUnavailable("sql", ...), and a constraint
    violation the operation did not name more precisely into Conflict."""
    try:
        yield
    except exc.IntegrityError as error:
        raise Conflict(" ".join(str(error.orig).split())) from error
    except TimeoutError as error:  # asyncio.timeout's deadline, or the driver's connect timeout
        within = f" within {timeout:g} s" if timeout is not None else " in time"
        raise StoreUnavailable("sql", f"the database did not answer{within}") from error
    except exc.DBAPIError as error:
        detail = " ".join(str(error.orig).split()) or type(error.orig).__name__
        if _missing_table(detail):
            detail += " (the tables are missing or old: run `citadel migrate`)"
        raise StoreUnavailable("sql", detail) from error
    except exc.TimeoutError as error:  # no pooled connection became free in time
        raise StoreUnavailable("sql", f"no free connection: {error}") from error
    except OSError as error:  # refused, reset, unreachable
        raise StoreUnavailable("sql", str(error) or type(error).__name__) from error
