"""Persisted queries, as Apollo's automatic persisted queries (APQ) send them.

A client sends ``extensions: {"persistedQuery": {"version": 1, "sha256Hash": "<hex>"}}`` (in a
POST body, or as the ``extensions`` parameter of a GET) instead of the query's text:

- a hash this service knows runs its query;
- an unknown hash answers the error ``PersistedQueryNotFound`` (``extensions.code``
  ``PERSISTED_QUERY_NOT_FOUND``), and the client sends the hash again with the query, which is
  registered when the hash is the query's SHA-256 (else ``PERSISTED_QUERY_HASH_MISMATCH``) and
  runs.

The registered queries are kept in Redis when Redis is configured (every replica knows a query
any one of them registered) for ``TTL_SECONDS``, and in a bounded in-process cache in front of
it (or alone, without Redis).
"""

from __future__ import annotations

import collections
import hashlib
import re
from collections.abc import AsyncIterator
from typing import Any, Final, Protocol

from graphql import GraphQLError
from strawberry.extensions import SchemaExtension

from citadel.errors import StoreUnavailable
from citadel.stores.endpoint import RedisStore

__all__ = ["MemoryQueryStore", "PersistedQueries", "QueryStore", "RedisQueryStore", "query_store"]

TTL_SECONDS: Final = 30 * 24 * 3600
MAX_QUERY_CHARS: Final = 100_000
_HASH: Final = re.compile(r"^[0-9a-f]{64}$")
_CACHE: Final = 2_000


class QueryStore(Protocol):
    async def get(self, sha256: str) -> str | None: ...
    async def put(self, sha256: str, query: str) -> None: ...
    async def aclose(self) -> None: ...


class MemoryQueryStore:
    """The most recently used ``size`` queries of this process."""

    def __init__(self, size: int = _CACHE) -> None:
        self._size = size
        self._queries: collections.OrderedDict[str, str] = collections.OrderedDict()

    async def get(self, sha256: str) -> str | None:
        query = self._queries.get(sha256)
        if query is not None:
            self._queries.move_to_end(sha256)
        return query

    async def put(self, sha256: str, query: str) -> None:
        self._queries[sha256] = query
        self._queries.move_to_end(sha256)
        while len(self._queries) > self._size:
            self._queries.popitem(last=False)

    async def aclose(self) -> None:
        self._queries.clear()


class RedisQueryStore:
    """Queries in Redis (``citadel:graphql:pq:<sha256>``), a memory cache in front."""

    def __init__(self, client: RedisStore, *, prefix: str = "citadel:graphql:pq:") -> None:
        self._client = client
        self._prefix = prefix
        self._cache = MemoryQueryStore()

    async def get(self, sha256: str) -> str | None:
        found = await self._cache.get(sha256)
        if found is not None:
            return found
        value = await self._client.execute("GET", self._prefix + sha256)
        if value is None:
            return None
        query = value.decode() if isinstance(value, bytes) else str(value)
        await self._cache.put(sha256, query)
        return query

    async def put(self, sha256: str, query: str) -> None:
        await self._cache.put(sha256, query)
        await self._client.execute("SET", self._prefix + sha256, query, "EX", TTL_SECONDS)

    async def aclose(self) -> None:
        await self._client.aclose()


def _error(message: str, code: str) -> GraphQLError:
    return GraphQLError(message, extensions={"code": code})


def _wanted(extensions: Any) -> str | None:
    """The hash a request's ``extensions`` names, None if it names none; GraphQLError if it
    names one badly."""
    if not isinstance(extensions, dict) or "persistedQuery" not in extensions:
        return None
    persisted = extensions["persistedQuery"]
    if not isinstance(persisted, dict):
        raise _error("'extensions.persistedQuery' must be an object.", "BAD_USER_INPUT")
    if persisted.get("version", 1) != 1:
        raise _error(
            "Only version 1 of persisted queries is supported (extensions.persistedQuery.version).",
            "PERSISTED_QUERY_NOT_SUPPORTED",
        )
    sha = persisted.get("sha256Hash")
    if not isinstance(sha, str) or not _HASH.match(sha.lower()):
        raise _error(
            "'extensions.persistedQuery.sha256Hash' must be 64 hexadecimal digits.",
            "BAD_USER_INPUT",
        )
    return sha.lower()


class PersistedQueries(SchemaExtension):
    """Put the text of a persisted query in place of its hash, or register it."""

    def __init__(self, *, store: QueryStore) -> None:
        self.store = store

    async def on_operation(self) -> AsyncIterator[None]:
        execution = self.execution_context
        sha = _wanted(execution.operation_extensions)
        if sha is not None:
            try:
                if execution.query:
                    if len(execution.query) > MAX_QUERY_CHARS:
                        raise _error(
                            f"A persisted query may be at most {MAX_QUERY_CHARS} characters.",
                            "BAD_USER_INPUT",
                        )
                    digest = hashlib.sha256(execution.query.encode()).hexdigest()
                    if digest != sha:
                        raise _error(
                            "provided sha does not match query: the hash must be the SHA-256 "
                            "of the query's text, in hexadecimal.",
                            "PERSISTED_QUERY_HASH_MISMATCH",
                        )
                    await self.store.put(sha, execution.query)
                else:
                    query = await self.store.get(sha)
                    if query is None:
                        raise _error("PersistedQueryNotFound", "PERSISTED_QUERY_NOT_FOUND")
                    execution.query = query
            except StoreUnavailable as exc:
                raise _error(
                    f"The persisted queries' store is unavailable ({exc.detail}); send the "
                    "query's text.",
                    "UNAVAILABLE",
                ) from exc
        yield


def query_store(settings: Any) -> QueryStore:
    """Redis when the settings name one (the shared routing state's), else memory."""
    from citadel.routing.shared import redis_url
    from citadel.stores.endpoint import connect_redis

    url = redis_url(settings)
    if url is None:
        return MemoryQueryStore()
    return RedisQueryStore(connect_redis(url, timeout=settings.limits.store_timeout_seconds * 4))
