"""A model server's error body, read as OpenAI's error shape.

OpenAI-compatible servers answer ``{"error": {"message", "type", "param", "code"}}``; others send
``{"message": ...}``, FastAPI's ``{"detail": ...}`` (a string or a list of validation errors,
as vLLM's 422 does), ``{"error": "text"}`` or plain text. :func:`read_upstream_error` keeps every
field the server sent and fills the rest from the status, so a client sees the server's own
``type``, ``code`` and ``param`` (``context_length_exceeded`` stays that) and its message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

__all__ = ["UpstreamErrorFields", "read_upstream_error"]

_MAX_MESSAGE = 2000
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_exceeded",
}


@dataclass(frozen=True, slots=True)
class UpstreamErrorFields:
    """The four fields of an OpenAI error body."""

    message: str
    type: str
    param: str | None
    code: str | None


def read_upstream_error(status: int, raw: bytes) -> UpstreamErrorFields:
    """The error fields of an upstream's error body of status ``status``."""
    default_type = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    try:
        doc: Any = orjson.loads(raw)
    except orjson.JSONDecodeError:
        text = raw.decode("utf-8", "replace").strip()
        return UpstreamErrorFields(_clip(text) or f"HTTP {status}", default_type, None, None)
    if isinstance(doc, dict):
        error = doc.get("error")
        if isinstance(error, dict):
            return UpstreamErrorFields(
                _clip(_text(error.get("message"))) or f"HTTP {status}",
                _str(error.get("type")) or default_type,
                _str(error.get("param")),
                _code(error.get("code")),
            )
        for key in ("error", "message", "detail"):
            value = doc.get(key)
            if value is not None:
                param = _detail_param(value) if key == "detail" else None
                return UpstreamErrorFields(
                    _clip(_text(value)), default_type, param, _code(doc.get("code"))
                )
    return UpstreamErrorFields(_clip(_text(doc)), default_type, None, None)


def _text(value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # FastAPI validation errors: [{"loc": [...], "msg": ...}]
        return "; ".join(
            str(item.get("msg", item)) if isinstance(item, dict) else str(item) for item in value
        )
    return orjson.dumps(value).decode() if value is not None else ""


def _detail_param(value: object) -> str | None:
    """The field FastAPI's first validation error names (``loc`` without ``body``)."""
    if isinstance(value, list) and value and isinstance(value[0], dict):
        loc = value[0].get("loc")
        if isinstance(loc, list):
            path = [str(p) for p in loc if p != "body"]
            return ".".join(path) or None
    return None


def _str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _code(value: object) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return _str(value)


def _clip(text: str) -> str:
    return text.strip()[:_MAX_MESSAGE]
