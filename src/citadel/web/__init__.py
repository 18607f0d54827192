"""The base of every Citadel service off the hot path: Litestar, served by uvicorn.

The gateway and the simulator run on ``citadel.http`` (the project's own server, three times
faster than any framework); every other service is a Litestar app built here, so that each gets
the same ``/health``, ``/metrics``, admin key, error bodies and docs without writing them::

    from litestar import Controller, get
    from citadel.web import Injected, Struct, create_service, errors, provide

    class Team(Struct):                     # a reply: msgspec gives the OpenAPI schema
        id: str
        name: str

    class TeamsController(Controller):
        path = "/v1/teams"
        tags = ["teams"]

        @get()
        async def list_teams(self, store: Injected[TeamStore]) -> list[Team]:
            return [Team(id=t.id, name=t.name) for t in await store.teams()]

        @get("/{team_id:str}", responses=errors(404))  # documents the 404's error body
        async def get_team(self, team_id: FromPath[str], store: Injected[TeamStore]) -> Team: ...

    def create_app(settings: Settings, deps: TeamDeps) -> Litestar:
        return create_service(
            "team-api",
            title="Citadel teams",
            settings=settings,
            registry=deps.registry,
            admin=[TeamsController],                    # behind the admin key
            dependencies={"store": provide(deps.store)},   # the handlers' `store` argument
            health={"store": store_health},              # name -> async () -> DependencyHealth
            errors={StoreUnavailable: lambda exc: Unavailable(str(exc))},
            on_shutdown=[deps.store.aclose],
        )

What ``create_service`` gives every app:

- ``GET /health`` (no key): ``{"status", "service", "version", "dependencies"}`` from the
  ``health`` checks (``citadel.health``), 503 when a critical one is down; ``health_extra`` adds
  fields of the service's own.
- ``GET /metrics`` (no key): the service's ``Registry`` in the Prometheus text format, with
  ``citadel_service_info`` and ``citadel_http_requests_total`` by route template and status;
  ``metrics_extra`` appends series rendered at scrape time (called before the registry
  renders, so it may bring the registry's own series up to date).
- The admin key on every handler passed as ``admin`` (a ``before_request`` hook rather than a
  guard: Litestar copies the handler object on every guard call) (the router carries the
  OpenAPI ``bearer`` security requirement); the admin key or the read-only key
  (``CITADEL_READONLY_KEY``) on those passed as ``readers``; handlers passed as ``public`` are open.
- One exception handler: every error, the framework's own included (404, 405, 413, a body that
  fails its ``msgspec.Struct``), becomes the OpenAI-style body of ``citadel.errors``, with
  ``param`` naming the field (``overrides.tokens_per_day``). ``errors`` maps a service's own
  exceptions to ``ApiError``s; anything else is a logged 500 that names no internals.
- Query parameters a handler does not declare are a 400 naming them (unless its ``opt`` has
  ``reads_own_query``: a handler that parses the query string itself, as GraphQL's GET does).
- ``GET /openapi.json`` (OpenAPI 3.1, generated from the handlers and Structs) and ``GET /docs``
  (Swagger UI from files shipped in this package: no CDN, so it works air-gapped).
- ``documented_body(Struct)`` as a handler's ``operation_class``: the document describes a body
  the handler reads and checks itself (``await request.body()``).
- ``x-request-id`` on every response (the client's, if well-formed, else a new one).

Litestar 2.25 wants every handler argument marked: ``FromPath[...]``, ``FromQuery[...]``,
``JSONBody[...]`` (``litestar.params``) and ``Injected[...]`` for dependencies.
Bodies and replies are ``msgspec.Struct``s with constraints in ``Meta(...)`` (``citadel.web.Struct``
refuses unknown fields); stores go in by dependency injection (``Provide``) under stable names.
``citadel.web.run.serve`` runs the app under uvicorn for ``citadel serve NAME``.
"""

from citadel.web.app import (
    ErrorTranslation,
    Injected,
    Listing,
    Struct,
    create_service,
    errors,
    provide,
)
from citadel.web.docs import documented_body

__all__ = [
    "ErrorTranslation",
    "Injected",
    "Listing",
    "Struct",
    "create_service",
    "documented_body",
    "errors",
    "provide",
]
