"""Prometheus's HTTP API, as the alerting service uses it: range queries and PromQL validation.

``query_range`` reads ``/api/v1/query_range`` into ``Series`` (one per label set, times in Unix
seconds, NaN and infinite samples dropped). ``validate`` asks Prometheus to evaluate the expression
once (``/api/v1/query``): a syntax error comes back as 400 ``bad_data``, which becomes
``InvalidQuery`` naming the rule and quoting Prometheus's message, so a bad definition is refused
by the same parser that would run it.

Errors::

    PrometheusError         Prometheus could not be reached, timed out, or answered badly
    └── InvalidQuery        Prometheus refused the expression (bad_data)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any
from urllib.parse import urlencode, urlsplit

import orjson

from citadel.errors import CitadelError
from citadel.http.client import (
    ConnectError,
    HttpClient,
    Origin,
    ProtocolError,
    ReadTimeout,
)

__all__ = ["InvalidQuery", "PrometheusClient", "PrometheusError", "Series"]


class PrometheusError(CitadelError):
    """Prometheus could not answer a query."""


class InvalidQuery(PrometheusError):
    """Prometheus refused a PromQL expression."""

    def __init__(self, rule: str, query: str, detail: str) -> None:
        self.rule = rule
        self.query = query
        self.detail = detail
        super().__init__(f"rule {rule!r}: invalid PromQL {query!r}: {detail}")


@dataclass(frozen=True, kw_only=True, slots=True)
class Series:
    """One time series: its labels and its samples, oldest first."""

    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    times: tuple[float, ...]
    values: tuple[float, ...]

    @property
    def key(self) -> str:
        """The label set as one stable string, ``{a="1",b="2"}``."""
        return "{" + ",".join(f'{k}="{v}"' for k, v in sorted(self.labels.items())) + "}"


class PrometheusClient:
    """Queries one Prometheus server through an injected ``HttpClient``."""

    def __init__(self, url: str, http: HttpClient, *, timeout: float = 10.0) -> None:
        self._origin = Origin.parse(url)
        self._prefix = urlsplit(url).path.rstrip("/")  # Prometheus may run under a path prefix
        self._http = http
        self._timeout = timeout
        self.url = url.rstrip("/")

    async def query_range(
        self, query: str, *, start: float, end: float, step: float
    ) -> list[Series]:
        """The samples of ``query`` from ``start`` to ``end`` every ``step`` seconds."""
        params = {"query": query, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"}
        status, doc = await self._post("/api/v1/query_range", params)
        if status != 200 or doc.get("status") != "success":
            raise PrometheusError(f"range query {query!r} failed: {_describe(status, doc)}")
        data = doc.get("data") or {}
        if data.get("resultType") != "matrix":
            raise PrometheusError(
                f"range query {query!r}: expected a matrix, got {data.get('resultType')!r}"
            )
        found: list[Series] = []
        for item in data.get("result") or []:
            points = [(float(t), _sample(v)) for t, v in item.get("values") or []]
            kept = [(t, v) for t, v in points if math.isfinite(v)]
            found.append(
                Series(
                    labels=MappingProxyType(
                        {str(k): str(v) for k, v in (item.get("metric") or {}).items()}
                    ),
                    times=tuple(t for t, _ in kept),
                    values=tuple(v for _, v in kept),
                )
            )
        return found

    async def validate(self, rule: str, query: str) -> None:
        """Raise InvalidQuery if Prometheus refuses ``query``; PrometheusError if it cannot say."""
        status, doc = await self._post("/api/v1/query", {"query": query})
        if status == 200 and doc.get("status") == "success":
            return
        if status in (400, 422) and doc.get("errorType") in ("bad_data", "execution"):
            raise InvalidQuery(rule, query, str(doc.get("error") or "refused"))
        raise PrometheusError(f"could not validate rule {rule!r}: {_describe(status, doc)}")

    async def ping(self) -> str:
        """Prometheus's version; PrometheusError if it does not answer."""
        status, doc = await self._get("/api/v1/status/buildinfo")
        if status != 200:
            raise PrometheusError(f"buildinfo answered {_describe(status, doc)}")
        return str((doc.get("data") or {}).get("version", "unknown"))

    # -- plumbing -------------------------------------------------------------------------------

    async def _post(self, path: str, params: Mapping[str, str]) -> tuple[int, dict[str, Any]]:
        body = urlencode(params).encode()
        headers = [(b"content-type", b"application/x-www-form-urlencoded")]
        return await self._call("POST", path, headers, body)

    async def _get(self, path: str) -> tuple[int, dict[str, Any]]:
        return await self._call("GET", path, [], b"")

    async def _call(
        self, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> tuple[int, dict[str, Any]]:
        try:
            response = await self._http.request(
                method,
                self._origin,
                self._prefix + path,
                [(b"accept", b"application/json"), *headers],
                body,
                connect_timeout=self._timeout,
                first_byte_timeout=self._timeout,
            )
            raw = await response.read()
        except (ConnectError, ReadTimeout, ProtocolError, OSError) as exc:
            raise PrometheusError(f"{self.url} did not answer: {exc}") from exc
        try:
            doc = orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError:
            doc = {"error": raw[:200].decode("utf-8", "replace")}
        return response.status, doc if isinstance(doc, dict) else {}


def _sample(value: object) -> float:
    try:
        return float(str(value))  # Prometheus sends "NaN", "+Inf" and numbers as strings
    except ValueError:
        return math.nan


def _describe(status: int, doc: Mapping[str, Any]) -> str:
    error = doc.get("error")
    kind = doc.get("errorType")
    return f"HTTP {status}" + (f" {kind}: {error}" if error else "")
