"""The Litestar service base (``citadel.web``): /health, /metrics, the admin key, error bodies,
validation that names the field, the docs without a CDN, all in-process."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Annotated, Any

import msgspec
import orjson
import pytest
from litestar import Controller, Litestar, get, post
from litestar.params import FromQuery, JSONBody, RawBody
from litestar.testing import AsyncTestClient

from citadel.errors import StoreUnavailable, Unavailable
from citadel.health import DependencyHealth
from citadel.metrics import Registry
from citadel.settings import Settings, load_settings
from citadel.web import Injected, Struct, create_service, documented_body, errors, provide

from conformance import Conformance

ADMIN = {"authorization": "Bearer sk-web-admin"}
pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Limits(Struct):
    tokens: Annotated[int, msgspec.Meta(ge=0, le=1_000_000_000_000)]
    note: Annotated[str, msgspec.Meta(min_length=1, max_length=10)] | None = None


class NewThing(Struct):
    name: Annotated[str, msgspec.Meta(min_length=1)]
    limits: Limits | None = None


class Thing(msgspec.Struct):
    name: str
    tokens: int | None
    count: int


class Store:
    """A store the app is wired with (injected as the handlers' ``store``)."""

    def __init__(self) -> None:
        self.names: list[str] = []


class ThingsController(Controller):
    path = "/v1/things"

    @post(responses=errors(503))
    async def create(self, data: JSONBody[NewThing], store: Injected[Store]) -> Thing:
        if data.name == "unavailable":
            raise StoreUnavailable("sql", "connection refused")
        store.names.append(data.name)
        tokens = None if data.limits is None else data.limits.tokens
        return Thing(name=data.name, tokens=tokens, count=len(store.names))

    @get()
    async def listing(
        self,
        store: Injected[Store],
        prefix: FromQuery[Annotated[str, msgspec.Meta(min_length=1)] | None] = None,
    ) -> list[str]:
        if prefix == "boom":
            raise RuntimeError("a bug")
        return [name for name in store.names if prefix is None or name.startswith(prefix)]


def settings() -> Settings:
    return load_settings(None, {"CITADEL_ADMIN_KEY": "sk-web-admin", "CITADEL_ENV": "test"})


def app(health: dict[str, Any] | None = None) -> Litestar:
    async def fine() -> DependencyHealth:
        return DependencyHealth("ok", "memory")

    async def extra() -> dict[str, object]:
        return {"ledger_lag": 0}

    return create_service(
        "things-api",
        title="Things",
        settings=settings(),
        registry=Registry(),
        admin=[ThingsController],
        dependencies={"store": provide(Store())},
        health=health if health is not None else {"store": fine},
        health_extra=extra,
        errors={StoreUnavailable: lambda exc: Unavailable(f"The {exc.store} store is down.")},
    )


@pytest.fixture
async def client() -> AsyncIterator[AsyncTestClient[Litestar]]:
    async with AsyncTestClient(app()) as client:
        yield client


async def document(client: AsyncTestClient[Litestar]) -> Conformance:
    return Conformance((await client.get("/openapi.json")).json())


async def test_health_names_each_dependency_and_the_service(
    client: AsyncTestClient[Litestar],
) -> None:
    """/health needs no key; it gives status, service, version, each dependency and extras."""
    reply = await client.get("/health")
    assert 200 == reply.status_code
    body = reply.json()
    assert ("ok", "things-api", 0) == (body["status"], body["service"], body["ledger_lag"])
    assert {"store": {"status": "ok", "detail": "memory"}} == body["dependencies"]
    (await document(client)).check("GET", "/health", 200, reply.content, "application/json")


async def test_a_critical_dependency_down_is_a_503() -> None:
    """A critical dependency that is down takes /health to 503 and status down."""

    async def down() -> DependencyHealth:
        return DependencyHealth("down", "refused", critical=True)

    async with AsyncTestClient(app({"db": down})) as client:
        reply = await client.get("/health")
    assert (503, "down") == (reply.status_code, reply.json()["status"])


async def test_metrics_count_requests_by_route_template(
    client: AsyncTestClient[Litestar],
) -> None:
    """/metrics is Prometheus text; requests are counted by template, unknown paths as one."""
    await client.get("/v1/things", headers=ADMIN)
    await client.get("/no/such/path/1")
    reply = await client.get("/metrics")
    assert reply.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = reply.text
    assert 'citadel_service_info{service="things-api"' in text
    assert 'route="/v1/things",status="200"' in text
    assert 'route="unmatched",status="404"' in text
    assert "/no/such/path" not in text


async def test_a_body_read_raw_is_documented_and_not_validated() -> None:
    """``documented_body`` puts a Struct's schema (nested Structs inlined) in the document of a
    handler that reads its own bytes; the framework checks nothing of it."""

    @post("/v1/raw", status_code=200, operation_class=documented_body(NewThing))
    async def raw(body: RawBody) -> int:
        return len(body)

    service = create_service(
        "raw-api", title="Raw", settings=settings(), registry=Registry(), admin=[raw]
    )
    async with AsyncTestClient(service) as client:
        document = (await client.get("/openapi.json")).json()
        reply = await client.post("/v1/raw", content=b"not even JSON", headers=ADMIN)
    operation = document["paths"]["/v1/raw"]["post"]
    schema = operation["requestBody"]["content"]["application/json"]["schema"]
    assert ["name"] == schema["required"]
    limits = schema["properties"]["limits"]["anyOf"][0]
    assert ["tokens"] == limits["required"]
    assert "$ref" not in orjson.dumps(schema).decode()
    assert {"400", "413"} <= set(operation["responses"])
    assert (200, 13) == (reply.status_code, reply.json())


async def test_metrics_need_the_metrics_token_when_one_is_set() -> None:
    """With metrics.token set, /metrics is a 401 (the OpenAI body, a bearer challenge) without
    it or with another key, the admin key included, and 200 with it."""
    scraped = load_settings(
        None,
        {
            "CITADEL_ADMIN_KEY": "sk-web-admin",
            "CITADEL_ENV": "test",
            "CITADEL_METRICS_TOKEN": "scrape-me",
        },
    )
    service = create_service("things-api", title="Things", settings=scraped, registry=Registry())
    async with AsyncTestClient(service) as client:
        spec = await document(client)
        for headers in ({}, ADMIN, {"authorization": "Bearer nope"}):
            reply = await client.get("/metrics", headers=headers)
            assert 401 == reply.status_code
            assert "metrics_token_required" == reply.json()["error"]["code"]
            assert 'Bearer realm="metrics"' == reply.headers["www-authenticate"]
            spec.check("GET", "/metrics", 401, reply.content, reply.headers["content-type"])
        reply = await client.get("/metrics", headers={"authorization": "Bearer scrape-me"})
        assert 200 == reply.status_code
        assert "citadel_service_info" in reply.text


@pytest.mark.parametrize(
    ("headers", "code"),
    [({}, "missing_api_key"), ({"authorization": "Bearer sk-wrong"}, "invalid_api_key")],
)
async def test_admin_routes_need_the_admin_key(
    client: AsyncTestClient[Litestar], headers: dict[str, str], code: str
) -> None:
    """An admin route without the key, or with a wrong one, is a 401 with the OpenAI body."""
    reply = await client.get("/v1/things", headers=headers)
    assert 401 == reply.status_code
    assert ("authentication_error", code) == (reply.json()["error"]["type"], code)
    (await document(client)).check("GET", "/v1/things", 401, reply.content, "application/json")


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        (b"", None, "empty"),
        (b'{"name": ', None, "not valid JSON"),
        (b"[1]", None, "JSON object"),
        (b"{}", "name", "required"),
        (b'{"name": ""}', "name", "length >= 1"),
        (b'{"name": "a", "colour": 1}', "colour", "Unknown field"),
        (b'{"name": "a", "limits": {}}', "limits.tokens", "required"),
        (b'{"name": "a", "limits": {"tokens": 1e300}}', "limits.tokens", "Expected `int`"),
        (b'{"name": "a", "limits": {"tokens": 1000000000001}}', "limits.tokens", "<= 1"),
        (b'{"name": "a", "limits": {"tokens": 1, "x": 1}}', "limits.x", "Unknown field"),
        (b'{"name": "a", "limits": {"tokens": 1, "note": ""}}', "limits.note", "length"),
    ],
)
async def test_a_bad_body_is_a_400_naming_the_field(
    client: AsyncTestClient[Litestar], body: bytes, param: str | None, words: str
) -> None:
    """Each bad body is a 400 with the OpenAI error body; ``param`` names the field, dotted."""
    headers = ADMIN | {"content-type": "application/json"}
    reply = await client.post("/v1/things", content=body, headers=headers)
    assert 400 == reply.status_code, reply.text
    error = reply.json()["error"]
    assert ("invalid_request_error", param) == (error["type"], error["param"])
    assert words in error["message"]
    (await document(client)).check("POST", "/v1/things", 400, reply.content, "application/json")


async def test_a_good_body_is_served_and_matches_its_schema(
    client: AsyncTestClient[Litestar],
) -> None:
    """A valid body reaches the handler with its injected store; the reply fits its schema."""
    body = {"name": "a", "limits": {"tokens": 5}}
    reply = await client.post("/v1/things", content=orjson.dumps(body), headers=ADMIN)
    assert (201, {"name": "a", "tokens": 5, "count": 1}) == (reply.status_code, reply.json())
    (await document(client)).check("POST", "/v1/things", 201, reply.content, "application/json")


async def test_query_parameters_are_checked(client: AsyncTestClient[Litestar]) -> None:
    """An undeclared query parameter is a 400 naming it; a declared one reaches the handler."""
    reply = await client.get("/v1/things?perfix=a", headers=ADMIN)
    assert (400, "perfix") == (reply.status_code, reply.json()["error"]["param"])
    await client.post("/v1/things", json={"name": "ab"}, headers=ADMIN)
    await client.post("/v1/things", json={"name": "b"}, headers=ADMIN)
    reply = await client.get("/v1/things?prefix=", headers=ADMIN)
    assert (200, ["ab", "b"]) == (reply.status_code, reply.json())
    reply = await client.get("/v1/things?prefix=a", headers=ADMIN)
    assert (200, ["ab"]) == (reply.status_code, reply.json())


async def test_errors_are_translated_once(client: AsyncTestClient[Litestar]) -> None:
    """A service's own exception goes through its translation; a bug is a 500 naming nothing
    internal; unknown paths and methods are 404 and 405 with the OpenAI body."""
    reply = await client.post("/v1/things", json={"name": "unavailable"}, headers=ADMIN)
    assert (503, "The sql store is down.") == (reply.status_code, reply.json()["error"]["message"])
    reply = await client.get("/v1/things?prefix=boom", headers=ADMIN)
    assert 500 == reply.status_code
    assert "a bug" not in reply.text
    assert "server_error" == reply.json()["error"]["type"]
    reply = await client.get("/v1/" + "x" * 5000, headers=ADMIN)
    assert (404, "unknown_url") == (reply.status_code, reply.json()["error"]["code"])
    assert len(reply.content) < 500
    reply = await client.delete("/v1/things", headers=ADMIN)
    assert (405, "method_not_allowed") == (reply.status_code, reply.json()["error"]["code"])


async def test_request_ids_are_echoed_or_made(client: AsyncTestClient[Litestar]) -> None:
    """A well-formed x-request-id comes back as sent; otherwise a new one is made."""
    reply = await client.get("/health", headers={"x-request-id": "abc-123"})
    assert "abc-123" == reply.headers["x-request-id"]
    reply = await client.get("/health", headers={"x-request-id": "bad id"})
    assert re.fullmatch(r"[0-9a-f]{24}", reply.headers["x-request-id"])


async def test_docs_are_served_from_the_package(client: AsyncTestClient[Litestar]) -> None:
    """/docs loads Swagger UI from this service (no CDN) and points it at /openapi.json."""
    page = (await client.get("/docs")).text
    assert "cdn" not in page.lower()
    assert '"/openapi.json"' in page
    for asset in re.findall(r'(?:src|href)="(/docs/assets/[^"]+)"', page):
        reply = await client.get(asset)
        assert 200 == reply.status_code
        assert len(reply.content) > 10_000
    assert 404 == (await client.get("/docs/assets/../../settings.py")).status_code


async def test_the_document_describes_security_and_errors(
    client: AsyncTestClient[Litestar],
) -> None:
    """OpenAPI 3.1: admin operations carry the bearer requirement and a 401; open ones none;
    every error response has the OpenAI-style body."""
    doc = (await client.get("/openapi.json")).json()
    assert doc["openapi"].startswith("3.1")
    create = doc["paths"]["/v1/things"]["post"]
    assert [{"bearer": []}] == create["security"]
    assert {"201", "400", "401", "413", "503"} <= set(create["responses"])
    assert [] == doc["paths"]["/health"]["get"]["security"]
    error = create["responses"]["503"]["content"]["application/json"]["schema"]
    assert {"$ref": "#/components/schemas/Error"} == error
