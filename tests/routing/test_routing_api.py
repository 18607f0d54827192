"""The routing service as a real process: `citadel serve routing-api` probing a simulator and a
closed port, sharing state through Redis (DB 12) with a gateway replica played by the test.

Deployment names carry a suffix of this run's own, so the shared keys of one run never meet
another's; they are removed at the end.
"""

from __future__ import annotations

import asyncio
import http.client
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from litestar.testing import AsyncTestClient

from citadel.errors import BadRequest
from citadel.http.client import HttpClient
from citadel.metrics import Registry
from citadel.openai.requests import parse_request
from citadel.routing.app import RoutingDeps, create_app
from citadel.routing.breaker import BreakerState
from citadel.routing.router import Router
from citadel.routing.shared import SharedRoutingState
from citadel.settings import Deployment, Model, Settings, load_settings
from citadel.stores.redis import RedisClient

from conformance import Conformance
from support import free_port, start_process, stop_process

ADMIN = "sk-test-routing-admin"
REDIS = os.environ.get("CITADEL_TEST_REDIS", "redis://127.0.0.1:6379/12")
RUN = uuid.uuid4().hex[:8]
LIVE_A, LIVE_B, DEAD, CODER = (f"{n}-{RUN}" for n in ("gen-a", "gen-b", "gen-dead", "coder-a"))
GENERAL, CODE_MODEL = f"general-{RUN}", f"coder-{RUN}"
REPLICA = f"gw-{RUN}"  # the gateway replica the test plays
REPLICA_2 = f"gw2-{RUN}"  # and a second one
CONFIG = """
gateway: {{admin_key: "{admin}"}}
endpoints: {{redis: "{redis}"}}
tiers:
  free: {{models: ["{general}"]}}
  enterprise: {{requests_per_minute: 1000}}
routing:
  balancer: peak_ewma
  health: {{interval_seconds: 0.2, timeout_seconds: 0.5, unhealthy_after: 2}}
models:
  - name: {general}
    specialties: [chat]
    price: {{input_per_1k: 0.1, output_per_1k: 0.2}}
    deployments:
      - {{name: {live_a}, url: "{sim}", model: sim-chat}}
      - {{name: {live_b}, url: "{sim}", model: sim-chat}}
      - {{name: {dead}, url: "{closed}", model: sim-chat}}
  - name: {coder}
    specialties: [code]
    price: {{input_per_1k: 1.0, output_per_1k: 2.0}}
    deployments:
      - {{name: {coder_a}, url: "{sim}", model: sim-code}}
"""
SECURED = [
    ("GET", "/v1/deployments"),
    ("GET", f"/v1/deployments/{LIVE_A}"),
    ("POST", f"/v1/deployments/{LIVE_A}/drain"),
    ("POST", f"/v1/deployments/{LIVE_A}/restore"),
    ("POST", "/v1/route"),
]
OPEN = ["/health", "/metrics", "/docs", "/openapi.json"]
CODE_PROMPT = "Why does this fail?\n```python\ndef add(a, b):\n    return a - b\n```"


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    content_type: str = ""

    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass(frozen=True)
class Service:
    port: int
    settings: Settings
    document: Conformance | None = None

    def call(
        self,
        method: str,
        path: str,
        body: object = None,
        *,
        key: str | None = ADMIN,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        headers = {"content-type": "application/json", **(headers or {})}
        if key is not None:
            headers["authorization"] = f"Bearer {key}"
        payload = body if isinstance(body, bytes) else b"" if body is None else orjson.dumps(body)
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path, payload, headers)
            response = conn.getresponse()
            reply = Reply(response.status, response.read(), response.getheader("content-type", ""))
        finally:
            conn.close()
        if self.document is not None:  # every reply is checked against the served document
            self.document.check(method, path, reply.status, reply.body, reply.content_type)
        return reply

    def rows(self) -> dict[str, dict[str, Any]]:
        reply = self.call("GET", "/v1/deployments")
        assert 200 == reply.status, reply.body
        return {row["deployment"]: row for row in reply.json()["data"]}

    def route(self, body: dict[str, Any]) -> dict[str, Any]:
        reply = self.call("POST", "/v1/route", body)
        assert 200 == reply.status, reply.body
        result: dict[str, Any] = reply.json()
        return result


def wait_for(check: Callable[[], bool], what: str, timeout: float = 8.0) -> None:
    """Poll a state another process reaches on its own clock."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)


async def _clean_keys() -> None:
    client = RedisClient.from_url(REDIS, timeout=1.0)
    try:
        names = (LIVE_A, LIVE_B, DEAD, CODER)
        await client.execute("SREM", "citadel:{routing}:drained", *names)
        await client.execute("DEL", *(f"citadel:{{routing}}:open:{n}" for n in names))
        for replica in (REPLICA, REPLICA_2):
            await client.execute("DEL", f"citadel:{{routing}}:snapshot:{replica}")
        await client.execute("SREM", "citadel:{routing}:replicas", REPLICA, REPLICA_2)
    finally:
        await client.aclose()


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    sim_port, port = free_port(), free_port()
    sim = start_process([sys.executable, "-m", "citadel", "sim", "--port", str(sim_port)], sim_port)
    path: Path = tmp_path_factory.mktemp("routing") / "citadel.yaml"
    path.write_text(
        CONFIG.format(
            admin=ADMIN,
            redis=REDIS,
            general=GENERAL,
            coder=CODE_MODEL,
            live_a=LIVE_A,
            live_b=LIVE_B,
            dead=DEAD,
            coder_a=CODER,
            sim=f"http://127.0.0.1:{sim_port}",
            closed=f"http://127.0.0.1:{free_port()}",
        )
    )
    args = [sys.executable, "-m", "citadel", "--config", str(path), "serve", "routing-api"]
    try:
        proc = start_process([*args, "--port", str(port)], port)
        try:
            svc = Service(port, load_settings(str(path), {}), Conformance.fetch("127.0.0.1", port))

            def probed() -> bool:
                rows = svc.rows()
                return not rows[DEAD]["healthy"] and rows[LIVE_A]["health_detail"].startswith(
                    "probe"
                )

            wait_for(probed, "the closed port is unhealthy and the simulator probed")
            yield svc
        finally:
            stop_process(proc)
    finally:
        stop_process(sim)
        asyncio.run(_clean_keys())


def test_deployments_show_each_deployments_state(service: Service) -> None:
    """GET /v1/deployments shows the closed port unhealthy after its probes failed, the live
    deployments healthy, and each one's breaker, load, latency and error rate."""
    rows = service.rows()
    assert {LIVE_A, LIVE_B, DEAD, CODER} == set(rows)
    assert (False, True, True) == tuple(rows[n]["healthy"] for n in (DEAD, LIVE_A, CODER))
    assert "probe failed" in rows[DEAD]["health_detail"]
    assert "probe answered 200" == rows[LIVE_A]["health_detail"]
    for name in (
        "breaker",
        "breaker_open_seconds",
        "drained",
        "latency_ewma_seconds",
        "in_flight",
        "error_rate_ewma",
    ):
        assert name in rows[LIVE_A]
    assert ("closed", False, 0) == (rows[LIVE_A]["breaker"], rows[LIVE_A]["drained"], 0)
    body = service.call("GET", "/v1/deployments").json()
    assert "ok" == body["shared_state"]["status"]
    assert isinstance(body["replicas"], dict)
    assert 1 == body["summary"]["unhealthy"]


def test_dry_run_explains_the_choice_and_skips_the_unhealthy(service: Service) -> None:
    """A dry run names a healthy deployment and the balancer's reason, lists the candidates
    with their scores and the dead one as excluded for its health; nothing counts as traffic."""
    for _ in range(5):
        result = service.route({"model": GENERAL, "messages": [{"role": "user", "content": "hi"}]})
        assert result["deployment"] in {LIVE_A, LIVE_B}
    assert (GENERAL, False, "chat") == (result["model"], result["virtual"], result["endpoint"])
    assert result["reason"].startswith("peak_ewma: ")
    (evaluation,) = result["evaluations"]
    assert {LIVE_A, LIVE_B} == {c["deployment"] for c in evaluation["candidates"]}
    assert all("latency_score" in c and "load" in c for c in evaluation["candidates"])
    (excluded,) = evaluation["excluded"]
    assert DEAD == excluded["deployment"]
    assert excluded["reasons"][0].startswith("unhealthy: probe failed")

    rows = service.rows()
    assert [0, 0, 0, 0] == [rows[n]["requests"] for n in (LIVE_A, LIVE_B, DEAD, CODER)]
    metrics = service.call("GET", "/metrics", key=None).body.decode()
    assert f'deployment="{LIVE_A}",balancer' not in metrics


def test_auto_resolves_code_to_the_code_specialist(service: Service) -> None:
    """`model: auto` with code in the prompt resolves to the model specialised in code, and says
    why; a plain question goes to the chat model; `task` overrides the guess."""
    code = service.route({"model": "auto", "messages": [{"role": "user", "content": CODE_PROMPT}]})
    assert (True, "code", CODE_MODEL, CODER) == (
        code["virtual"],
        code["task"],
        code["model"],
        code["deployment"],
    )
    assert f"{CODE_MODEL} specialises in code" in code["model_reason"]

    chat = service.route({"model": "auto", "prompt": "What is the capital of France?"})
    assert ("chat", GENERAL) == (chat["task"], chat["model"])
    hinted = service.route({"model": "auto", "prompt": "hello", "task": "code"})
    assert ("code", CODE_MODEL) == (hinted["task"], hinted["model"])
    hello = {"model": "auto", "prompt": "hello"}
    by_header = service.call("POST", "/v1/route", hello, headers={"x-citadel-task": "code"})
    assert (200, "code") == (by_header.status, by_header.json()["task"])
    overridden = service.call(
        "POST",
        "/v1/route",
        {"model": "auto", "prompt": "hello", "task": "chat"},
        headers={"x-citadel-task": "code"},
    )
    assert "chat" == overridden.json()["task"]


def test_drain_and_restore_change_the_next_dry_run(service: Service) -> None:
    """Draining a deployment takes it out of the next dry runs, here and, through Redis, on a
    gateway replica at its next sync; restoring brings it back."""
    reply = service.call("POST", f"/v1/deployments/{LIVE_A}/drain")
    try:
        assert 200 == reply.status, reply.body
        assert (True, True) == (reply.json()["deployment"]["drained"], reply.json()["shared"])
        for _ in range(5):
            result = service.route({"model": GENERAL})
            assert LIVE_B == result["deployment"]
        excluded = {e["deployment"]: e["reasons"] for e in result["evaluations"][0]["excluded"]}
        assert ["drained by an operator"] == excluded[LIVE_A]
        assert asyncio.run(_gateway_sees_drained(service.settings)) == {LIVE_A}
    finally:
        reply = service.call("POST", f"/v1/deployments/{LIVE_A}/restore")
    assert 200 == reply.status
    assert not reply.json()["deployment"]["drained"]
    result = service.route({"model": GENERAL})
    assert {LIVE_A, LIVE_B} == {c["deployment"] for c in result["evaluations"][0]["candidates"]}
    assert asyncio.run(_gateway_sees_drained(service.settings)) == set()


def test_a_model_with_every_deployment_drained_gets_no_deployment(service: Service) -> None:
    """With its only deployment drained (forced), a dry run for the model finds none and says
    why."""
    assert 200 == service.call("POST", f"/v1/deployments/{CODER}/drain?force=true", {}).status
    try:
        result = service.route({"model": CODE_MODEL, "prompt": "x"})
    finally:
        assert 200 == service.call("POST", f"/v1/deployments/{CODER}/restore").status
    assert result["deployment"] is None
    assert "no deployment of" in result["reason"]
    assert CODER == service.route({"model": CODE_MODEL, "prompt": "x"})["deployment"]


async def _gateway_sees_drained(settings: Settings) -> set[str]:
    """The drained deployments a gateway replica's router has after one sync."""
    shared = SharedRoutingState(RedisClient.from_url(REDIS, timeout=1.0), replica="gw-probe")
    router = Router(settings, registry=Registry(), on_transition=shared.on_transition)
    try:
        await shared.sync(router, time.monotonic(), push=False)
    finally:
        await shared.aclose()
    return {name for name, state in router.states.items() if state.drained}


def test_a_breaker_open_on_a_gateway_replica_is_held_here(service: Service) -> None:
    """A breaker a gateway replica opens shows here as held open for that replica within about
    a second, dry runs route around it, and it closes when the replica's entry expires; the
    replica's pushed snapshot is listed; the transitions are metrics."""
    replica = REPLICA

    async def publish() -> None:
        shared = SharedRoutingState(RedisClient.from_url(REDIS, timeout=1.0), replica=replica)
        try:
            now = time.monotonic()
            await shared.publish_open(LIVE_B, now + 60.0, now)
            await shared.push_snapshot([{"deployment": LIVE_B, "breaker": "open"}])
        finally:
            await shared.aclose()

    asyncio.run(publish())
    try:
        wait_for(
            lambda: service.rows()[LIVE_B]["breaker_forced_by"] == replica,
            "the breaker is held open here",
        )
        row = service.rows()[LIVE_B]
        assert (True, replica) == (row["breaker_held_open"], row["breaker_forced_by"])
        result = service.route({"model": GENERAL})
        assert LIVE_A == result["deployment"]
        excluded = {e["deployment"]: e["reasons"] for e in result["evaluations"][0]["excluded"]}
        assert ["breaker held open (open on another replica)"] == excluded[LIVE_B]
        body = service.call("GET", "/v1/deployments").json()
        assert [{"deployment": LIVE_B, "breaker": "open"}] == body["replicas"][replica]
    finally:
        asyncio.run(_clean_keys())
    wait_for(
        lambda: service.rows()[LIVE_B]["breaker"] == BreakerState.CLOSED.value,
        "the held breaker is reset",
    )
    metrics = service.call("GET", "/metrics", key=None).body.decode()
    for line in (
        f'citadel_breaker_transitions_total{{deployment="{LIVE_B}",from_state="closed",'
        'to_state="open",event="force_open"} 1.0',
        f'citadel_breaker_transitions_total{{deployment="{LIVE_B}",from_state="open",'
        'to_state="closed",event="reset"} 1.0',
    ):
        assert line in metrics


@pytest.mark.parametrize(("method", "path"), SECURED)
@pytest.mark.parametrize("key", [None, "sk-wrong"])
def test_admin_routes_need_the_admin_key(
    service: Service, method: str, path: str, key: str | None
) -> None:
    """Every admin route answers 401 without the admin key, and changes nothing."""
    reply = service.call(method, path, {"model": GENERAL} if path == "/v1/route" else None, key=key)
    assert 401 == reply.status
    assert "authentication_error" == reply.json()["error"]["type"]
    assert not service.rows()[LIVE_A]["drained"]


@pytest.mark.parametrize("path", OPEN)
def test_health_metrics_and_docs_need_no_key(service: Service, path: str) -> None:
    """/health, /metrics, /docs and /openapi.json answer without a key."""
    assert 200 == service.call("GET", path, key=None).status


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/deployments/no-such"),
        ("POST", "/v1/deployments/no-such/drain"),
        ("POST", "/v1/deployments/no-such/restore"),
    ],
)
def test_an_unknown_deployment_is_404(service: Service, method: str, path: str) -> None:
    """An unknown deployment name is a 404 naming it."""
    reply = service.call(method, path)
    assert 404 == reply.status
    error = reply.json()["error"]
    assert ("name", "deployment_not_found") == (error["param"], error["code"])
    assert "'no-such'" in error["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"", None),
        (b"{not json", None),
        (b"[1, 2]", None),
        ({"prompt": "hi"}, "model"),
        ({"model": 7}, "model"),
        ({"model": GENERAL, "task": "poetry"}, "task"),
        ({"model": GENERAL, "messages": [], "prompt": "x"}, "prompt"),
        ({"model": GENERAL, "messages": "hi"}, "messages"),
        ({"model": GENERAL, "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"model": GENERAL, "max_tokens": 0}, "max_tokens"),
        ({"model": GENERAL, "stream": "yes"}, "stream"),
        ({"model": GENERAL, "input": "embed me"}, "model"),
        ({"model": GENERAL, "tier": "gold"}, "tier"),
        ({"model": GENERAL, "tier": 3}, "tier"),
    ],
)
def test_a_bad_dry_run_body_is_400_naming_the_field(
    service: Service, body: object, param: str | None
) -> None:
    """A malformed dry-run body is a 400 whose param names the offending field."""
    reply = service.call("POST", "/v1/route", body)
    assert 400 == reply.status, reply.body
    error = reply.json()["error"]
    assert ("invalid_request_error", param) == (error["type"], error["param"])


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"  ",
        b"{not json",
        b"[1, 2]",
        b'{"model": "m", "messages": ' + b"[" * 70 + b"]" * 70 + b"}",
        orjson.dumps({"model": GENERAL, "messages": [{"role": "robot", "content": "x"}]}),
        orjson.dumps({"model": GENERAL, "messages": [{"role": "user"}], "temperature": 5}),
        orjson.dumps({"model": GENERAL, "messages": [], "stream_options": {}}),
    ],
)
def test_a_dry_run_refuses_a_chat_body_as_the_gateway_does(service: Service, raw: bytes) -> None:
    """A chat body the gateway refuses gets the very same 400 from the dry run: the same parser
    reads the same bytes."""
    with pytest.raises(BadRequest) as refused:
        parse_request("chat", raw)
    reply = service.call("POST", "/v1/route", raw)
    assert (400, orjson.loads(refused.value.body())) == (reply.status, reply.json())


def test_an_unknown_model_or_a_drain_with_fields_is_refused(service: Service) -> None:
    """A dry run for a model nobody serves is a 404; a drain takes no fields (400 naming the
    field), and no body, {} or null are all the same empty drain."""
    reply = service.call("POST", "/v1/route", {"model": "no-such-model"})
    assert (404, "model_not_found") == (reply.status, reply.json()["error"]["code"])
    reply = service.call("POST", f"/v1/deployments/{LIVE_A}/drain", {"really": True})
    assert (400, "really") == (reply.status, reply.json()["error"]["param"])
    reply = service.call("POST", f"/v1/deployments/{LIVE_A}/restore", b"{nope")
    assert (400, "invalid_json") == (reply.status, reply.json()["error"]["code"])
    assert not service.rows()[LIVE_A]["drained"]
    for body in (None, {}, b"null"):
        assert 200 == service.call("POST", f"/v1/deployments/{LIVE_A}/restore", body).status


def test_health_reports_deployments_and_shared_state(service: Service) -> None:
    """/health summarises the deployments and reports Redis as a non-critical dependency."""
    body = service.call("GET", "/health", key=None).json()
    assert ("ok", "routing-api") == (body["status"], body["service"])
    deps = body["dependencies"]
    assert "ok" == deps["shared_state"]["status"]
    assert "1 unhealthy" in deps["deployments"]["detail"]


def test_openapi_documents_every_route(service: Service) -> None:
    """/openapi.json lists every route with its security, and /docs loads Swagger UI on it."""
    document = service.call("GET", "/openapi.json", key=None).json()
    paths = document["paths"]
    for method, path in SECURED:
        template = path.replace(LIVE_A, "{name}")
        operation = paths[template][method.lower()]
        assert [{"bearer": []}] == operation["security"]
    assert "requestBody" in paths["/v1/route"]["post"]
    assert {"404", "409"} <= set(paths["/v1/deployments/{name}/drain"]["post"]["responses"])
    docs = service.call("GET", "/docs", key=None).body.decode()
    assert "swagger-ui" in docs
    assert "/openapi.json" in docs


def test_a_drain_with_redis_unreachable_is_a_503_that_changes_nothing(tmp_path: Path) -> None:
    """With the shared state's Redis unreachable, a drain is a 503 and the deployment stays in
    rotation; the listing says the shared state is unavailable and `replicas` is null; /health
    reports it down but not critical. Every reply fits the served document."""
    path = tmp_path / "citadel.yaml"
    path.write_text(
        f'gateway: {{admin_key: "{ADMIN}"}}\n'
        f'endpoints: {{redis: "redis://127.0.0.1:{free_port()}/0"}}\n'
        "models:\n"
        f"  - {{name: solo, deployments: [{{name: solo-a, url: 'http://127.0.0.1:{free_port()}', "
        "model: m}]}\n",
        encoding="utf-8",
    )
    port = free_port()
    args = [sys.executable, "-m", "citadel", "--config", str(path), "serve", "routing-api"]
    proc = start_process([*args, "--port", str(port)], port)
    try:
        svc = Service(port, load_settings(str(path), {}), Conformance.fetch("127.0.0.1", port))
        reply = svc.call("POST", "/v1/deployments/solo-a/drain?force=true")
        assert (503, "service_unavailable") == (reply.status, reply.json()["error"]["type"])
        assert "nothing was changed" in reply.json()["error"]["message"]
        body = svc.call("GET", "/v1/deployments").json()
        assert ("unavailable", None) == (body["shared_state"]["status"], body["replicas"])
        assert not body["data"][0]["drained"]
        health = svc.call("GET", "/health", key=None)
        shared = health.json()["dependencies"]["shared_state"]
        assert (200, "down") == (health.status, shared["status"])
    finally:
        assert 0 == stop_process(proc)


def test_without_redis_the_listing_has_no_replicas_and_drains_are_local() -> None:
    """Without Redis (in-process): `shared_state` is disabled, `replicas` absent, and a drain
    is this service's alone (`shared: false`); the replies fit the document."""
    settings = load_settings(None, {"CITADEL_ADMIN_KEY": ADMIN, "CITADEL_ENV": "test"})
    closed = f"http://127.0.0.1:{free_port()}"
    deployment = Deployment(name="solo-a", url=closed, upstream_model="m")
    settings = settings.with_models((Model(name="solo", deployments=(deployment,)),))
    headers = {"authorization": f"Bearer {ADMIN}"}

    async def run() -> tuple[Any, ...]:
        app = create_app(settings, RoutingDeps(client=HttpClient()))
        async with AsyncTestClient(app) as client:
            document = Conformance((await client.get("/openapi.json")).json())
            listing = await client.get("/v1/deployments", headers=headers)
            drained = await client.post(
                "/v1/deployments/solo-a/drain", headers=headers, params={"force": "true"}
            )
            restored = await client.post("/v1/deployments/solo-a/restore", headers=headers)
        for method, path, reply in (
            ("GET", "/v1/deployments", listing),
            ("POST", "/v1/deployments/solo-a/drain?force=true", drained),
            ("POST", "/v1/deployments/solo-a/restore", restored),
        ):
            document.check(method, path, reply.status_code, reply.content, "application/json")
        return listing.json(), drained.json(), restored.json()

    listing, drained, restored = asyncio.run(run())
    assert "disabled" == listing["shared_state"]["status"]
    assert "replicas" not in listing
    assert (True, False) == (drained["deployment"]["drained"], drained["shared"])
    assert not restored["deployment"]["drained"]


def test_the_listing_shows_what_the_gateways_see_first(service: Service) -> None:
    """Issue 18 item 8: with gateway replicas reporting, `data` is their state merged (requests
    and in-flight summed, latency weighted by requests, unhealthy when any replica says so),
    not this service's idle copy; `replicas` still lists each replica's rows; one deployment's
    view is the merged one too; a deployment no replica reports keeps this service's row."""
    own = service.rows()
    assert (0, 0) == (own[LIVE_A]["requests"], own[LIVE_A]["reported_by"])

    async def push() -> None:
        for replica, row in (
            (REPLICA, {"requests": 7, "in_flight": 2, "latency_ewma_seconds": 0.1}),
            (
                REPLICA_2,
                {
                    "requests": 3,
                    "in_flight": 1,
                    "latency_ewma_seconds": 0.2,
                    "healthy": False,
                    "health_detail": "probe failed: refused",
                },
            ),
        ):
            shared = SharedRoutingState(RedisClient.from_url(REDIS, timeout=1.0), replica=replica)
            try:
                await shared.push_snapshot([{"deployment": LIVE_A, "breaker": "closed", **row}])
            finally:
                await shared.aclose()

    asyncio.run(push())
    try:
        body = service.call("GET", "/v1/deployments").json()
        assert "gateways" == body["view"]
        rows = {r["deployment"]: r for r in body["data"]}
        row = rows[LIVE_A]
        assert (10, 3, 2, False) == (
            row["requests"],
            row["in_flight"],
            row["reported_by"],
            row["healthy"],
        )
        assert 0.13 == pytest.approx(row["latency_ewma_seconds"])
        assert "probe failed: refused" == row["health_detail"]
        assert (0, True) == (rows[LIVE_B]["reported_by"], rows[LIVE_B]["healthy"])
        assert {REPLICA, REPLICA_2} <= set(body["replicas"])
        assert 7 == body["replicas"][REPLICA][0]["requests"]
        one = service.call("GET", f"/v1/deployments/{LIVE_A}").json()
        assert (10, 2) == (one["requests"], one["reported_by"])
    finally:
        asyncio.run(_clean_keys())
    assert "routing-service" == service.call("GET", "/v1/deployments").json()["view"]


def test_a_dry_run_takes_the_callers_tier_into_account(service: Service) -> None:
    """Issue 18 item 8: `auto` chooses among the models the caller's tier may use (the free
    tier may use only the general model, so code goes there), and a model the tier may not use
    gets no deployment, with the gateway's 403 as the reason; without a tier, any model."""
    code = {"model": "auto", "messages": [{"role": "user", "content": CODE_PROMPT}]}
    assert CODE_MODEL == service.route(code)["model"]
    assert CODE_MODEL == service.route({**code, "tier": "enterprise"})["model"]
    free = service.route({**code, "tier": "free"})
    assert ("code", GENERAL) == (free["task"], free["model"])
    assert free["deployment"] in {LIVE_A, LIVE_B}
    named = service.route({"model": CODE_MODEL, "prompt": "x", "tier": "free"})
    assert (CODE_MODEL, None, []) == (named["model"], named["deployment"], named["evaluations"])
    assert "tier 'free' may not use" in named["reason"]
    assert "403" in named["reason"]


def test_draining_a_models_last_deployment_needs_force(service: Service) -> None:
    """Issue 18 item 8: draining the only deployment of a model not drained is a 409 that
    changes nothing (every request would be a 503); with ?force=true it is drained. Draining
    one of several is not refused, but the last of them is."""
    reply = service.call("POST", f"/v1/deployments/{CODER}/drain")
    assert 409 == reply.status, reply.body
    error = reply.json()["error"]
    assert ("force", "last_deployment") == (error["param"], error["code"])
    assert "?force=true" in error["message"]
    assert not service.rows()[CODER]["drained"]
    try:
        for name in (LIVE_A, LIVE_B):
            assert 200 == service.call("POST", f"/v1/deployments/{name}/drain").status
        assert 409 == service.call("POST", f"/v1/deployments/{DEAD}/drain").status
        reply = service.call("POST", f"/v1/deployments/{CODER}/drain?force=true")
        assert (200, True) == (reply.status, reply.json()["deployment"]["drained"])
        bad = service.call("POST", f"/v1/deployments/{CODER}/drain?force=maybe")
        assert 400 == bad.status
    finally:
        for name in (CODER, LIVE_A, LIVE_B):
            assert 200 == service.call("POST", f"/v1/deployments/{name}/restore").status
