"""OpenAPI 3.1 for a service: routes registered with their description, served with their docs.

    api = ApiRoutes(app, title="Citadel rate limiting")
    api.add(Operation(method="GET", path="/v1/users/{user_id}", summary="Get a user",
                      response=USER), get_user)

``add`` routes the handler on the ``App`` and describes it in the document, so the document lists
exactly what is served. A path template's ``{name}`` matches one path segment; the handler gets
the segments by name. ``/openapi.json`` serves the document and ``/docs`` a page that loads
Swagger UI from the jsDelivr CDN and points it at ``/openapi.json`` (as FastAPI does).

Schemas are JSON Schema (the 2020-12 dialect OpenAPI 3.1 uses) written as plain dicts.
"""

from __future__ import annotations

import html
import http
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import orjson

from citadel import __version__
from citadel.errors import MethodNotAllowed, NotFound
from citadel.http.server import Request, Response
from citadel.service import App

__all__ = ["ERROR_SCHEMA", "ApiRoutes", "Operation", "PathHandler", "Schema"]

Schema = dict[str, Any]
PathHandler = Callable[[Request, Mapping[str, str]], Awaitable[Response]]

SWAGGER_UI = "https://cdn.jsdelivr.net/npm/swagger-ui-dist@5"
_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")

ERROR_SCHEMA: Schema = {
    "type": "object",
    "description": "An OpenAI-style error.",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}


@dataclass(frozen=True, kw_only=True, slots=True)
class Operation:
    """One method on one path, as the OpenAPI document describes it."""

    method: str  # GET, POST, ...
    path: str  # a template: /v1/users/{user_id}
    summary: str
    description: str = ""
    request: Schema | None = None  # the JSON body's schema, if the operation takes one
    response: Schema | None = None  # the JSON body's schema of the success response
    status: int = 200  # the success status
    errors: tuple[int, ...] = ()  # other statuses it answers (401 is added when secured)
    query: tuple[tuple[str, str], ...] = ()  # optional string query parameters: (name, meaning)
    tags: tuple[str, ...] = ()
    secured: bool = True  # needs ``Authorization: Bearer <key>``
    content_type: str = "application/json"  # of the success response

    @property
    def parameters(self) -> tuple[str, ...]:
        """The names of the path template's parameters, in order."""
        return tuple(_PARAM.findall(self.path))

    @property
    def operation_id(self) -> str:
        words = re.sub(r"[^A-Za-z0-9]+", "_", self.path.replace("{", "").replace("}", ""))
        return f"{self.method.lower()}{words.rstrip('_')}"

    def match(self, path: str) -> dict[str, str] | None:
        """The template's parameters in ``path`` (percent-decoded), or None if it does not fit."""
        template, given = self.path.split("/"), path.split("/")
        if len(template) != len(given):
            return None
        found: dict[str, str] = {}
        for pattern, segment in zip(template, given, strict=True):
            name = _PARAM.fullmatch(pattern)
            if name is None:
                if pattern != segment:
                    return None
            elif not segment:
                return None
            else:
                found[name.group(1)] = unquote(segment)
        return found


class ApiRoutes:
    """The documented routes of one ``App``, and its ``/openapi.json`` and ``/docs``."""

    def __init__(
        self, app: App, *, title: str, version: str = __version__, description: str = ""
    ) -> None:
        self._app = app
        self._info: dict[str, str] = {"title": title, "version": version}
        if description:
            self._info["description"] = description
        self._operations: list[Operation] = []
        # Templated paths, by the literal prefix before their first parameter.
        self._templated: dict[str, list[tuple[Operation, PathHandler]]] = {}
        self._document: bytes | None = None
        app.route("GET", "/openapi.json", self._serve_document)
        app.route("GET", "/docs", self._serve_docs)
        self.describe(
            Operation(
                method="GET",
                path="/openapi.json",
                summary="This OpenAPI document",
                response={"type": "object"},
                tags=("docs",),
                secured=False,
            )
        )
        self.describe(
            Operation(
                method="GET",
                path="/docs",
                summary="Interactive documentation (Swagger UI)",
                content_type="text/html",
                tags=("docs",),
                secured=False,
            )
        )
        # Every App serves these two itself (citadel.service).
        for path, summary in (
            ("/health", "Service and dependency health"),
            ("/metrics", "Metrics"),
        ):
            self.describe(
                Operation(
                    method="GET",
                    path=path,
                    summary=summary,
                    tags=("operations",),
                    secured=False,
                    content_type="application/json" if path == "/health" else "text/plain",
                    response={"type": "object"} if path == "/health" else None,
                )
            )

    @property
    def operations(self) -> tuple[Operation, ...]:
        return tuple(self._operations)

    def describe(self, operation: Operation) -> None:
        """Document an operation that is routed elsewhere (``/health``, say)."""
        self._operations.append(operation)
        self._document = None

    def add(self, operation: Operation, handler: PathHandler) -> None:
        """Route ``handler`` for ``operation`` and document it."""
        self.describe(operation)
        path, method = operation.path, operation.method
        if not operation.parameters:

            async def fixed(request: Request) -> Response:
                return await handler(request, {})

            self._app.route(method, path, fixed)
            return
        prefix = path[: path.index("{")]
        entries = self._templated.setdefault(prefix, [])
        if not any(op.method == method for op, _ in entries):
            self._app.route_prefix(method, prefix, self._dispatcher(prefix, method))
        entries.append((operation, handler))

    def _dispatcher(self, prefix: str, method: str) -> Callable[[Request], Awaitable[Response]]:
        async def dispatch(request: Request) -> Response:
            allowed: set[str] = set()
            for operation, handler in self._templated[prefix]:
                params = operation.match(request.path)
                if params is None:
                    continue
                if operation.method == method:
                    return await handler(request, params)
                allowed.add(operation.method)
            if allowed:
                allow = ", ".join(sorted(allowed))
                raise MethodNotAllowed(
                    f"Method {method} is not allowed on {request.path}; use {allow}.",
                    headers=((b"allow", allow.encode()),),
                )
            raise NotFound(f"Unknown path {request.path}.", code="unknown_url")

        return dispatch

    # -- the document --------------------------------------------------------------------------

    def document(self) -> dict[str, Any]:
        """The OpenAPI 3.1 document of every operation added or described."""
        paths: dict[str, dict[str, Any]] = {}
        for operation in self._operations:
            paths.setdefault(operation.path, {})[operation.method.lower()] = _operation(operation)
        return {
            "openapi": "3.1.0",
            "info": dict(self._info),
            "paths": paths,
            "components": {
                "securitySchemes": {
                    "bearer": {
                        "type": "http",
                        "scheme": "bearer",
                        "description": "The admin key: `Authorization: Bearer <key>`.",
                    }
                },
                "schemas": {"Error": ERROR_SCHEMA},
            },
        }

    async def _serve_document(self, request: Request) -> Response:
        if self._document is None:
            self._document = orjson.dumps(self.document())
        return Response(200, self._document)

    async def _serve_docs(self, request: Request) -> Response:
        return Response(200, _docs_page(self._info["title"]), content_type=b"text/html")


def _operation(op: Operation) -> dict[str, Any]:
    doc: dict[str, Any] = {"operationId": op.operation_id, "summary": op.summary}
    if op.description:
        doc["description"] = op.description
    if op.tags:
        doc["tags"] = list(op.tags)
    parameters: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in op.parameters
    ]
    parameters += [
        {
            "name": name,
            "in": "query",
            "required": False,
            "description": meaning,
            "schema": {"type": "string"},
        }
        for name, meaning in op.query
    ]
    if parameters:
        doc["parameters"] = parameters
    if op.request is not None:
        doc["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": op.request}},
        }
    success: dict[str, Any] = {"description": _phrase(op.status)}
    if op.status != 204:
        schema = op.response if op.response is not None else {"type": "string"}
        success["content"] = {op.content_type: {"schema": schema}}
    responses: dict[str, Any] = {str(op.status): success}
    errors = {*op.errors, *((401,) if op.secured else ())}
    for status in sorted(errors):
        responses[str(status)] = {
            "description": _phrase(status),
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
    doc["responses"] = responses
    doc["security"] = [{"bearer": []}] if op.secured else []
    return doc


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return f"Status {status}"


def _docs_page(title: str) -> bytes:
    name = html.escape(title)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{name} - Swagger UI</title>
<link rel="stylesheet" type="text/css" href="{SWAGGER_UI}/swagger-ui.css">
</head>
<body>
<div id="swagger-ui"></div>
<script src="{SWAGGER_UI}/swagger-ui-bundle.js"></script>
<script>
window.ui = SwaggerUIBundle({{
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  layout: "BaseLayout",
  deepLinking: true,
  persistAuthorization: true,
  presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
}});
</script>
</body>
</html>
""".encode()
