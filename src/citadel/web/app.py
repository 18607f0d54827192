"""``create_service``: one Litestar app with what every Citadel service shares (see the package's
docstring for its use)."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from http import HTTPStatus
from typing import TYPE_CHECKING, Annotated, Any, Generic, Literal, TypeAlias, TypeVar

import msgspec
from litestar import Litestar, Request, Response, Router, get
from litestar.datastructures import MutableScopeHeaders
from litestar.di import Dependency, Provide
from litestar.exceptions import (
    HTTPException,
    MethodNotAllowedException,
    NotFoundException,
    ValidationException,
)
from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.openapi.plugins import JsonRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme
from litestar.params import ParameterKwarg, SkipValidationMarker

from citadel import __version__
from citadel.adminkey import AdminKey
from citadel.errors import (
    ApiError,
    BadRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
)
from citadel.health import HealthCheck, Status, check_all
from citadel.metrics import HTTP_REQUESTS, SERVICE_INFO, Registry
from citadel.web.docs import docs_handlers

if TYPE_CHECKING:
    from litestar.connection import ASGIConnection
    from litestar.handlers import BaseRouteHandler
    from litestar.types import ControllerRouterHandler, Message, Scope

    from citadel.settings import Settings

__all__ = [
    "ErrorTranslation",
    "Injected",
    "Listing",
    "Struct",
    "create_service",
    "errors",
    "provide",
]

_log = logging.getLogger("citadel.web")

ErrorTranslation = Callable[[Any], ApiError]
Hook = Callable[[], Awaitable[None]]
_T = TypeVar("_T")

_JSON = "application/json"
_PROMETHEUS = "text/plain; version=0.0.4"
_MAX_REQUEST_ID = 128
_MAX_ECHO = 100  # characters of client input an error message repeats at most
_UNMATCHED = "unmatched"  # the route label of a request to an unknown path
_TYPED_PARAM = re.compile(r"\{(\w+):\w+\}")
_AT = re.compile(r"^(?P<message>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_FIELD = re.compile(r"^Object (?P<what>missing required|contains unknown) field `(?P<name>[^`]+)`")
# Names a handler can take that are not query parameters.
_RESERVED = frozenset(
    {"data", "request", "state", "headers", "cookies", "scope", "socket", "query", "body"}
)


class Struct(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A request body: an unknown field is a 400 naming it. Replies may use it too."""


class Listing(msgspec.Struct, Generic[_T]):
    """A list reply, as OpenAI's: ``{"object": "list", "data": [...]}``."""

    data: list[_T]
    object: Literal["list"] = "list"


Injected: TypeAlias = Annotated[_T, Dependency(kind="named"), SkipValidationMarker()]
"""A handler argument given by name from ``dependencies`` (``store: Injected[TeamStore]``); not
validated, so a ``Protocol`` may be its type."""


def provide(value: _T) -> Provide:
    """A dependency that is one object made at wiring time (a store, a clock, the settings)."""

    def dependency() -> _T:
        return value

    return Provide(dependency, use_cache=True, sync_to_thread=False)


def errors(*statuses: int) -> dict[int, ResponseSpec]:
    """``responses=`` of a handler that can answer these error statuses (the document gives each
    the OpenAI-style error body). 400, 401 and 413 are added where they apply."""
    return {
        status: ResponseSpec(None, description=HTTPStatus(status).phrase) for status in statuses
    }


class DependencyState(msgspec.Struct):
    status: Status
    detail: str


class HealthReply(msgspec.Struct):
    """What /health answers; a service may add fields of its own."""

    status: Status
    service: str
    version: str
    dependencies: dict[str, DependencyState]


def create_service(
    name: str,
    *,
    title: str,
    settings: Settings,
    registry: Registry,
    admin: Sequence[ControllerRouterHandler] = (),
    readers: Sequence[ControllerRouterHandler] = (),
    public: Sequence[ControllerRouterHandler] = (),
    description: str = "",
    dependencies: Mapping[str, Provide] | None = None,
    health: Mapping[str, HealthCheck] | None = None,
    health_extra: Callable[[], Awaitable[Mapping[str, object]]] | None = None,
    metrics_extra: Callable[[], Awaitable[bytes]] | None = None,
    errors: Mapping[type[Exception], ErrorTranslation] | None = None,
    on_startup: Sequence[Hook] = (),
    on_shutdown: Sequence[Hook] = (),
    version: str = __version__,
    middleware: Sequence[Any] = (),
) -> Litestar:
    """A service's app: ``admin`` handlers behind the admin key, ``public`` ones open, plus
    /health, /metrics, /openapi.json and /docs. ``on_shutdown`` hooks run last first, each
    even if another failed."""
    checks = dict(health or {})
    registry.gauge(SERVICE_INFO).set((name, version), 1.0)

    @get(
        "/health",
        summary="Service health and the state of each dependency",
        tags=["operations"],
        security=[],
        media_type=_JSON,
        responses={503: ResponseSpec(HealthReply, description="a critical dependency is down")},
    )
    async def health_handler() -> Response[HealthReply]:
        status, deps = await check_all(checks)
        body: dict[str, object] = {
            "status": status,
            "service": name,
            "version": version,
            "dependencies": deps,
        }
        if health_extra is not None:
            body |= await health_extra()
        return Response(body, status_code=503 if status == "down" else 200)  # type: ignore[arg-type]

    token = settings.metrics_token()
    scrape_key = None if token is None else AdminKey(token)

    @get(
        "/metrics",
        summary="Metrics in the Prometheus text format",
        description="Open, or behind `metrics.token` (by default the admin key outside "
        "development and test).",
        tags=["operations"],
        security=[],
        media_type=_PROMETHEUS,
        responses={401: ResponseSpec(None, description="metrics.token is set and not sent")},
    )
    async def metrics_handler(request: Request[Any, Any, Any]) -> Response[bytes]:
        if scrape_key is not None:
            _scrape_token(scrape_key, request.headers.get("authorization"))
        # The extra series first: rendering them may bring the registry's own up to date.
        extra = b"" if metrics_extra is None else await metrics_extra()
        return Response(registry.render() + extra, media_type=_PROMETHEUS)

    key = AdminKey(settings.gateway.admin_key)
    reader = AdminKey(settings.gateway.admin_key, settings.gateway.readonly_key)

    async def before_request(request: Request[Any, Any, Any]) -> None:
        # The admin key and the query check, in one hook rather than as guards: Litestar copies
        # the handler for each guard call (~50 us a request each).
        handler = request.route_handler
        needs = handler.opt.get("admin")
        if needs:
            value = request.headers.get("authorization")
            (reader if needs == "read" else key).verify(
                None if value is None else value.encode("latin-1")
            )
        if not handler.opt.get("reads_own_query"):
            _known_query_only(request, handler)

    handlers: list[ControllerRouterHandler] = [
        health_handler,
        metrics_handler,
        *docs_handlers(),
        *public,
    ]
    if admin:
        handlers.append(
            Router("/", route_handlers=list(admin), opt={"admin": True}, security=[{"bearer": []}])
        )
    if readers:
        handlers.append(
            Router(
                "/", route_handlers=list(readers), opt={"admin": "read"}, security=[{"bearer": []}]
            )
        )
    return Litestar(
        route_handlers=handlers,
        dependencies=dict(dependencies or {}),
        before_request=before_request,
        exception_handlers={Exception: _exception_handler(dict(errors or {}))},
        before_send=[_observer(name, registry)],
        middleware=list(middleware),
        on_startup=list(on_startup),
        on_shutdown=[_run_all(list(reversed(on_shutdown)))],
        openapi_config=OpenAPIConfig(
            title=title,
            version=version,
            description=description or None,
            path="/schema",
            render_plugins=[JsonRenderPlugin()],
            components=Components(
                security_schemes={
                    "bearer": SecurityScheme(
                        type="http", scheme="bearer", description="the admin key"
                    )
                }
            ),
        ),
        request_max_body_size=settings.gateway.max_body_bytes,
        logging_config=None,
        debug=False,
    )


def _scrape_token(key: AdminKey, authorization: str | None) -> None:
    """Refuse a scrape without ``metrics.token`` (as the gateway's own /metrics does)."""
    try:
        key.verify(None if authorization is None else authorization.encode("latin-1"))
    except Unauthorized as exc:
        raise Unauthorized(
            "/metrics needs 'Authorization: Bearer <metrics.token>' (or the admin key when "
            "metrics.token is unset).",
            code="metrics_token_required",
            headers=((b"www-authenticate", b'Bearer realm="metrics"'),),
        ) from exc


def _run_all(hooks: Sequence[Hook]) -> Hook:
    async def run() -> None:
        for hook in hooks:
            try:
                await hook()
            except Exception:
                _log.exception("shutdown hook failed")

    return run


# -- requests ---------------------------------------------------------------------------------


def _short(text: str) -> str:
    return text if len(text) <= _MAX_ECHO else text[:_MAX_ECHO] + "..."


def _query_names(handler: BaseRouteHandler) -> frozenset[str]:
    names = set()
    injected = handler.resolve_dependencies()
    for field in handler.parsed_fn_signature.parameters.values():
        if field.name in injected:  # not a query parameter
            continue
        kwarg = field.kwarg_definition
        alias = kwarg.name or kwarg.query if isinstance(kwarg, ParameterKwarg) else None
        if alias is not None:  # `scope_: QueryParameter(name="scope")` takes ?scope=
            names.add(alias)
        elif field.name not in _RESERVED:
            names.add(field.name)
    return frozenset(names)


def _known_query_only(
    connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler
) -> None:
    """Refuse a query parameter the handler does not take: a typo must not pass silently."""
    if not connection.query_params:
        return
    known = _query_names(handler)
    for given in connection.query_params:
        if given not in known:
            expected = ", ".join(sorted(known)) or "none"
            raise BadRequest(
                f"Unknown query parameter '{_short(given)}'; expected: {expected}.",
                param=_short(given),
            )


def _request_id(scope: Scope) -> str:
    for header, value in scope["headers"]:
        if header == b"x-request-id":
            if len(value) <= _MAX_REQUEST_ID and all(32 < c < 127 for c in value):
                return value.decode()
            break
    return os.urandom(12).hex()


def _observer(name: str, registry: Registry) -> Callable[[Message, Scope], Awaitable[None]]:
    """Set ``x-request-id`` and count the response by route template (never by raw path: a scan
    of random paths must not add a metric series per path) and status."""
    requests = registry.counter(HTTP_REQUESTS)

    async def observe(message: Message, scope: Scope) -> None:
        if message["type"] != "http.response.start":
            return
        MutableScopeHeaders.from_message(message)["x-request-id"] = _request_id(scope)
        template = scope.get("path_template")
        route = _TYPED_PARAM.sub(r"{\1}", template) if template else _UNMATCHED
        method = str(scope.get("method", "GET"))
        requests.inc((name, method, route, str(message["status"])))

    return observe


# -- errors -----------------------------------------------------------------------------------


def _exception_handler(
    translations: Mapping[type[Exception], ErrorTranslation],
) -> Callable[[Request[Any, Any, Any], Exception], Response[bytes]]:
    def handle(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
        error = _api_error(request, exc, translations)
        return Response(
            error.body(),
            status_code=error.status,
            media_type=_JSON,
            headers={name.decode(): value.decode() for name, value in error.headers},
        )

    return handle


def _api_error(
    request: Request[Any, Any, Any],
    exc: Exception,
    translations: Mapping[type[Exception], ErrorTranslation],
) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if not isinstance(exc, HTTPException):  # the framework's own (some are ValueErrors) first
        for kind in type(exc).__mro__:
            translate = translations.get(kind)
            if translate is not None:
                return translate(exc)
    if isinstance(exc, ValidationException):
        return _invalid(exc, _aliases(request.route_handler))
    if isinstance(exc, NotFoundException):
        return NotFound(f"Unknown path {_short(request.url.path)}.", code="unknown_url")
    if isinstance(exc, MethodNotAllowedException):
        return MethodNotAllowed(
            f"Method {_short(request.method)} is not allowed on {_short(request.url.path)}."
        )
    if isinstance(exc, HTTPException) and exc.status_code < 500:
        if exc.status_code == PayloadTooLarge.status:
            return PayloadTooLarge("The request body is larger than the service accepts.")
        decode = _cause(exc, msgspec.DecodeError)
        if decode is not None:
            return BadRequest(f"The request body is not valid JSON: {decode}.", code="invalid_json")
        error = ApiError(exc.detail, code=None)
        error.status, error.type = exc.status_code, "invalid_request_error"
        return error
    _log.exception("unhandled error", extra={"path": request.url.path})
    return ApiError("The server had an error while processing your request.")


def _cause(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The first exception of ``kind`` in the chain that led to ``exc``."""
    seen: BaseException | None = exc
    while seen is not None and not isinstance(seen, kind):
        seen = seen.__cause__ or seen.__context__
    return seen


def _aliases(handler: BaseRouteHandler) -> dict[str, str]:
    """The query names of the handler's arguments named otherwise (``format_`` -> ``format``)."""
    found = {}
    for field in handler.parsed_fn_signature.parameters.values():
        kwarg = field.kwarg_definition
        if isinstance(kwarg, ParameterKwarg) and (alias := kwarg.name or kwarg.query):
            found[field.name] = alias
    return found


def _invalid(exc: ValidationException, aliases: Mapping[str, str]) -> BadRequest:
    """A 400 whose ``param`` names the field (dotted: ``reservation.lease_id``), from msgspec's
    error (``Expected `int`, got `str` - at `$.data.tokens```), or the query parameter by the
    name the client gave it."""
    cause = exc.__cause__
    if not isinstance(cause, msgspec.ValidationError):
        return BadRequest(f"The request is invalid: {exc.detail}.")
    found = _AT.match(str(cause))
    assert found is not None  # the pattern matches any text
    message, path = found["message"], (found["path"] or "").lstrip(".")
    if path == "data" or path.startswith(("data.", "data[")):
        path = path[len("data") :].lstrip(".")
    elif path in aliases:
        path = aliases[path]
    field = _FIELD.match(message)
    if field is not None:
        param = f"{path}.{field['name']}" if path else field["name"]
        if param == "data":
            return BadRequest("The request body must be a JSON object; it is empty.")
        if field["what"] == "missing required":
            return BadRequest(f"'{param}' is required.", param=param)
        param = _short(param)
        return BadRequest(f"Unknown field '{param}'.", param=param)
    if not path:
        return BadRequest(f"The request body must be a JSON object as documented: {message}.")
    return BadRequest(f"'{path}' is invalid: {message}.", param=path)
