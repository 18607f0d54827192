"""``/openapi.json`` and ``/docs``: the generated document, and Swagger UI from files shipped in
the package (``assets/``, swagger-ui-dist 5, Apache-2.0), so the page works without a CDN."""

from __future__ import annotations

import html
from dataclasses import dataclass
from importlib import resources
from typing import Any

import msgspec
from litestar import Request, Response, get
from litestar.exceptions import NotFoundException
from litestar.handlers import HTTPRouteHandler
from litestar.openapi.spec import OpenAPIMediaType, Operation, RequestBody, Schema
from litestar.params import FromPath

__all__ = ["ERROR_SCHEMA", "docs_handlers", "documented_body", "finish"]

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "An OpenAI-style error.",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
_ERROR_REF = {"$ref": "#/components/schemas/Error"}
_ERRORS = {
    "400": "the request is invalid (an unknown query parameter, a bad field); `param` names it",
    "401": "no admin key, or a wrong one",
    "404": "no such resource",
    "413": "the request body is too large",
}
_METHODS = ("get", "put", "post", "delete", "patch")

_ASSETS = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
}
_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<link rel="stylesheet" href="/docs/assets/swagger-ui.css">
</head>
<body>
<div id="swagger-ui"></div>
<script src="/docs/assets/swagger-ui-bundle.js"></script>
<script>
window.ui = SwaggerUIBundle({{url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true}});
</script>
</body>
</html>
"""


def finish(document: dict[str, Any]) -> dict[str, Any]:
    """Litestar's document, made true to what the service answers: every error has the
    OpenAI-style body (where a handler gives no body of its own, and where Litestar describes
    its validation error), any operation can answer 400 (an unknown query parameter, at least),
    a secured operation can answer 401, an open one says
    ``security: []``, and /openapi.json answers an object."""
    document.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR_SCHEMA
    for path, item in document.get("paths", {}).items():
        for method in _METHODS:
            operation = item.get(method)
            if operation is None:
                continue
            responses = operation.setdefault("responses", {})
            if operation.get("security"):
                responses.setdefault("401", {"description": _ERRORS["401"]})
            else:
                operation["security"] = []
            # every handler refuses a query parameter it does not take (citadel.web.app)
            responses.setdefault("400", {"description": _ERRORS["400"]})
            if "requestBody" in operation:
                responses.setdefault("413", {"description": _ERRORS["413"]})
            for status, response in responses.items():
                if int(status) >= 400 and _framework_error(response):
                    response["content"] = {"application/json": {"schema": _ERROR_REF}}
            if path == "/openapi.json":
                responses["200"]["content"] = {"application/json": {"schema": {"type": "object"}}}
    return document


def documented_body(kind: type[Any]) -> type[Operation]:
    """``operation_class=`` for a handler that reads and checks its JSON body itself (from
    ``await request.body()``, say with a parser shared with the gateway): the document describes
    the body with ``kind``'s schema (a ``msgspec.Struct``), which then validates nothing."""
    (top,), components = msgspec.json.schema_components([kind], ref_template="{name}")
    schema = _Verbatim(document=_inline(top, components))
    body = RequestBody(required=True, content={"application/json": OpenAPIMediaType(schema)})

    @dataclass
    class WithBody(Operation):
        def __post_init__(self) -> None:
            self.request_body = body

    return WithBody


class _Verbatim(Schema):
    """A JSON Schema that msgspec wrote, put in the document as it is."""

    def __init__(self, document: dict[str, Any]) -> None:
        super().__init__()
        self.document = document

    def to_schema(self) -> dict[str, Any]:
        return self.document


def _inline(schema: Any, components: dict[str, Any]) -> Any:
    """``schema`` with each ``{"$ref": name}`` replaced by its component (no Struct of a body
    nests itself, so this ends)."""
    if isinstance(schema, dict):
        if "$ref" in schema:
            return _inline(components[schema["$ref"]], components)
        return {key: _inline(value, components) for key, value in schema.items()}
    if isinstance(schema, list):
        return [_inline(value, components) for value in schema]
    return schema


def _framework_error(response: dict[str, Any]) -> bool:
    """Whether an error response has no body of its own, or Litestar's validation error's."""
    content = response.get("content")
    if not content:
        return True
    schema = content.get("application/json", {}).get("schema", {})
    return bool(schema.get("description") == "Validation Exception")


def docs_handlers() -> list[HTTPRouteHandler]:
    """The handlers of /openapi.json, /docs and the page's assets."""
    document: list[bytes] = []  # encoded once, at the first request

    @get(
        "/openapi.json",
        summary="This OpenAPI document",
        tags=["operations"],
        security=[],
        media_type="application/json",
        sync_to_thread=False,
    )
    def openapi(request: Request[Any, Any, Any]) -> Response[bytes]:
        if not document:
            document.append(msgspec.json.encode(finish(request.app.openapi_schema.to_schema())))
        return Response(document[0], media_type="application/json")

    @get(
        "/docs",
        summary="Interactive documentation (Swagger UI)",
        tags=["operations"],
        security=[],
        media_type="text/html",
        sync_to_thread=False,
    )
    def docs(request: Request[Any, Any, Any]) -> Response[str]:
        title = html.escape(request.app.openapi_schema.info.title)
        return Response(_PAGE.format(title=title), media_type="text/html")

    @get("/docs/assets/{name:str}", include_in_schema=False, sync_to_thread=False)
    def asset(name: FromPath[str]) -> Response[bytes]:
        media_type = _ASSETS.get(name)
        if media_type is None:
            raise NotFoundException()
        body = resources.files("citadel.web").joinpath("assets", name).read_bytes()
        return Response(
            body, media_type=media_type, headers={"cache-control": "public, max-age=86400"}
        )

    return [openapi, docs, asset]
