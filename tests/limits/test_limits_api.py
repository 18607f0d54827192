"""The rate-limiting service as a real process: `citadel serve rate-limiting-api` on SQLite and
Redis (DB 14), one variant on PostgreSQL, and the stores unreachable.

Every test makes users of its own (unique emails), so the Redis counters of one test never meet
another's.
"""

from __future__ import annotations

import http.client
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from citadel.accounts.migrate import ACCOUNTS

from conformance import Conformance
from support import free_port, process_output, scratch_postgres, start_process, stop_process

ADMIN = "sk-test-admin"
REDIS = "redis://127.0.0.1:6379/14"
CONFIG = """
tiers:
  tiny:
    requests_per_minute: 3
    tokens_per_minute: 1000
  pair:
    requests_per_minute: 1000
    concurrent_requests: 2
    tokens_per_day: 10000
    cost_per_month_usd: 1.5
  open: {{}}
accounts:
  database: "{database}"
  default_tier: pair
limits:
  backend: "{redis}"
models:
  - name: sim-chat
    aliases: [chat]
    deployments: [{{name: d1, url: "http://127.0.0.1:9"}}]
"""
# Every route the service documents, with the status an unauthenticated call must not get past.
ROUTES = [
    ("POST", "/v1/teams"),
    ("GET", "/v1/teams"),
    ("GET", "/v1/teams/{team_id}"),
    ("PATCH", "/v1/teams/{team_id}"),
    ("DELETE", "/v1/teams/{team_id}"),
    ("GET", "/v1/teams/{team_id}/budget"),
    ("PUT", "/v1/teams/{team_id}/budget"),
    ("POST", "/v1/users"),
    ("GET", "/v1/users"),
    ("GET", "/v1/users/{user_id}"),
    ("PATCH", "/v1/users/{user_id}"),
    ("DELETE", "/v1/users/{user_id}"),
    ("POST", "/v1/users/{user_id}/disable"),
    ("GET", "/v1/users/{user_id}/usage"),
    ("POST", "/v1/users/{user_id}/usage/reset"),
    ("POST", "/v1/keys"),
    ("GET", "/v1/keys"),
    ("POST", "/v1/keys/{key_id}/revoke"),
    ("GET", "/v1/tiers"),
    ("POST", "/v1/check"),
    ("POST", "/v1/reconcile"),
]
OPEN_ROUTES = [("GET", "/health"), ("GET", "/metrics"), ("GET", "/docs"), ("GET", "/openapi.json")]


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)

    @property
    def error(self) -> dict[str, Any]:
        error: dict[str, Any] = self.json()["error"]
        return error


@dataclass(frozen=True)
class Service:
    port: int
    document: Conformance | None = None

    def call(
        self,
        method: str,
        path: str,
        body: object = None,
        *,
        key: str | None = ADMIN,
        raw: bytes | None = None,
    ) -> Reply:
        headers = {"content-type": "application/json"}
        if key is not None:
            headers["authorization"] = f"Bearer {key}"
        payload = raw if raw is not None else b"" if body is None else orjson.dumps(body)
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path, payload, headers)
            response = conn.getresponse()
            reply = Reply(
                response.status,
                {k.lower(): v for k, v in response.getheaders()},
                response.read(),
            )
        finally:
            conn.close()
        if self.document is not None:  # every reply is checked against the served document
            content_type = reply.headers.get("content-type", "")
            self.document.check(method, path, reply.status, reply.body, content_type)
        return reply

    def user(self, tier: str | None = None, **extra: object) -> dict[str, Any]:
        body: dict[str, object] = {"name": "Ada", "email": f"{uuid.uuid4().hex}@example.com"}
        if tier is not None:
            body["tier"] = tier
        reply = self.call("POST", "/v1/users", body | extra)
        assert 201 == reply.status, reply.body
        user: dict[str, Any] = reply.json()
        return user

    def check(self, user_id: str, tokens: int = 10, **extra: object) -> Reply:
        return self.call("POST", "/v1/check", {"user_id": user_id, "tokens": tokens, **extra})


def _config(tmp: Path, database: str, redis: str = REDIS) -> str:
    path = tmp / "citadel.yaml"
    path.write_text(CONFIG.format(database=database, redis=redis), encoding="utf-8")
    return str(path)


def _command(config: str, port: int) -> list[str]:
    citadel = [sys.executable, "-m", "citadel", "--config", config]
    return [*citadel, "serve", "rate-limiting-api", "--port", str(port)]


ENV = {"CITADEL_ADMIN_KEY": ADMIN, "CITADEL_ENV": "test"}


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """The service on a fresh SQLite database and Redis DB 14."""
    tmp = tmp_path_factory.mktemp("ratelimit")
    config = _config(tmp, f"sqlite+aiosqlite:///{tmp / 'a.db'}")
    port = free_port()
    proc = start_process(_command(config, port), port, env=ENV)
    try:
        yield Service(port, Conformance.fetch("127.0.0.1", port))
    finally:
        output = process_output(proc)
        assert 0 == stop_process(proc), output
        assert "Traceback" not in output, output


# -- the open routes and the admin key ---------------------------------------------------------


def test_health_reports_the_accounts_store_and_the_limiter(service: Service) -> None:
    """/health needs no key and names both dependencies, each ok."""
    reply = service.call("GET", "/health", key=None)
    assert 200 == reply.status
    doc = reply.json()
    assert ("ok", "rate-limiting-api") == (doc["status"], doc["service"])
    assert {"accounts": "ok", "limiter": "ok"} == {
        name: dep["status"] for name, dep in doc["dependencies"].items()
    }
    assert {"accounts": "sqlite", "limiter": "redis"} == {
        name: dep["detail"] for name, dep in doc["dependencies"].items()
    }


@pytest.mark.parametrize(("method", "path"), ROUTES)
@pytest.mark.parametrize("key", [None, "sk-wrong", ""], ids=["no-key", "wrong-key", "empty"])
def test_every_admin_route_needs_the_admin_key(
    service: Service, method: str, path: str, key: str | None
) -> None:
    """Without the admin key, or with another, every route but the open ones is a 401."""
    concrete = path.replace("{user_id}", "usr_x").replace("{key_id}", "key_x")
    reply = service.call(method, concrete, {"name": "x"}, key=key)
    assert 401 == reply.status, reply.body
    assert "authentication_error" == reply.error["type"]


def test_docs_page_loads_swagger_ui_for_the_openapi_document(service: Service) -> None:
    """/docs is an HTML page that loads Swagger UI from the service itself (no CDN) pointing at
    /openapi.json."""
    reply = service.call("GET", "/docs", key=None)
    assert 200 == reply.status
    assert reply.headers["content-type"].startswith("text/html")
    page = reply.body.decode()
    assert '<script src="/docs/assets/swagger-ui-bundle.js">' in page
    assert "https://" not in page
    assert '"/openapi.json"' in page
    assert 200 == service.call("GET", "/docs/assets/swagger-ui-bundle.js", key=None).status


def test_openapi_document_lists_every_route(service: Service) -> None:
    """/openapi.json is OpenAPI 3.1 and documents exactly the routes served, secured or not."""
    reply = service.call("GET", "/openapi.json", key=None)
    assert 200 == reply.status
    doc = reply.json()
    assert doc["openapi"].startswith("3.1")
    listed = {
        (method.upper(), path) for path, methods in doc["paths"].items() for method in methods
    }
    assert set(ROUTES) | set(OPEN_ROUTES) == listed
    check = doc["paths"]["/v1/check"]["post"]
    assert [{"bearer": []}] == check["security"]
    assert {"200", "400", "401", "429", "503"} <= set(check["responses"])
    assert ["user_id"] == [
        p["name"] for p in doc["paths"]["/v1/users/{user_id}"]["get"]["parameters"]
    ]
    assert [] == doc["paths"]["/health"]["get"]["security"]


def test_unknown_paths_and_methods(service: Service) -> None:
    """An unknown path is a 404; a known one with the wrong method a 405 naming the right ones."""
    assert 404 == service.call("GET", "/v1/nothing").status
    assert 404 == service.call("GET", "/v1/users/usr_1/nothing").status
    reply = service.call("DELETE", "/v1/users")
    assert 405 == reply.status
    reply = service.call("PUT", "/v1/users/usr_1/disable")
    assert 405 == reply.status


def test_metrics_count_the_decisions(service: Service) -> None:
    """/metrics needs no key and counts /v1/check decisions by tier and outcome."""
    user = service.user("open")
    assert 200 == service.check(user["id"]).status
    reply = service.call("GET", "/metrics", key=None)
    assert 200 == reply.status
    assert 'citadel_limiter_decisions_total{tier="open",decision="allowed"}' in reply.body.decode()


# -- teams and users ---------------------------------------------------------------------------


def test_teams_are_created_listed_and_unique_by_name(service: Service) -> None:
    """A team is created (201), listed, and a second team of the same name is a 409."""
    name = f"team-{uuid.uuid4().hex[:8]}"
    reply = service.call("POST", "/v1/teams", {"name": name})
    assert 201 == reply.status
    team = reply.json()
    assert (name, "team") == (team["name"], team["object"])
    assert team["id"].startswith("team_")
    listing = service.call("GET", "/v1/teams").json()
    assert "list" == listing["object"]
    assert team in listing["data"]
    again = service.call("POST", "/v1/teams", {"name": name})
    assert 409 == again.status
    assert name in again.error["message"]


def test_a_user_is_created_with_the_default_tier_and_its_limits(service: Service) -> None:
    """A user without a tier gets accounts.default_tier, and shows its effective limits."""
    user = service.user()
    assert ("pair", "active", {}) == (user["tier"], user["status"], user["overrides"])
    assert {
        "requests_per_minute": 1000,
        "tokens_per_minute": None,
        "concurrent_requests": 2,
        "tokens_per_day": 10000,
        "tokens_per_month": None,
        "cost_per_month_usd": 1.5,
    } == user["limits"]
    assert user["created_at"].endswith("Z")
    assert user == service.call("GET", f"/v1/users/{user['id']}").json()


def test_users_are_listed_all_or_by_team(service: Service) -> None:
    """GET /v1/users lists every user; ?team_id= only that team's; an unknown team is a 404."""
    team = service.call("POST", "/v1/teams", {"name": f"t-{uuid.uuid4().hex[:8]}"}).json()
    member = service.user(team_id=team["id"])
    loner = service.user()
    everyone = {u["id"] for u in service.call("GET", "/v1/users").json()["data"]}
    assert {member["id"], loner["id"]} <= everyone
    members = service.call("GET", f"/v1/users?team_id={team['id']}").json()["data"]
    assert [member["id"]] == [u["id"] for u in members]
    unknown = service.call("GET", "/v1/users?team_id=team_nope")
    assert (404, "team_id") == (unknown.status, unknown.error["param"])
    bogus = service.call("GET", "/v1/users?teamid=x")
    assert (400, "teamid") == (bogus.status, bogus.error["param"])


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"email": "a@example.com"}, "name"),
        ({"name": "Ada"}, "email"),
        ({"name": "", "email": "a@example.com"}, "name"),
        ({"name": 7, "email": "a@example.com"}, "name"),
        ({"name": "Ada", "email": "not-an-email"}, "email"),
        ({"name": "Ada", "email": "a@example.com", "tier": "gold"}, "tier"),
        ({"name": "Ada", "email": "a@example.com", "team_id": 3}, "team_id"),
        ({"name": "Ada", "email": "a@example.com", "role": "admin"}, "role"),
    ],
)
def test_a_bad_new_user_is_a_400_naming_the_field(
    service: Service, body: dict[str, object], param: str
) -> None:
    """Each missing, mistyped or unknown field is a 400 whose error names it."""
    reply = service.call("POST", "/v1/users", body)
    assert 400 == reply.status, reply.body
    assert param == reply.error["param"]
    assert param in reply.error["message"]
    assert "invalid_request_error" == reply.error["type"]


@pytest.mark.parametrize(
    ("raw", "words"),
    [(b'{"name": ', "not valid JSON"), (b"[1, 2]", "JSON object"), (b"", "empty")],
)
def test_a_body_that_is_not_a_json_object_is_a_400(
    service: Service, raw: bytes, words: str
) -> None:
    """Bad JSON, a non-object or no body at all: a 400 saying which."""
    reply = service.call("POST", "/v1/users", raw=raw)
    assert 400 == reply.status
    assert words in reply.error["message"]


def test_a_second_user_with_the_same_email_is_a_409(service: Service) -> None:
    """Emails are unique: creating another user with one is a conflict naming it."""
    user = service.user()
    reply = service.call("POST", "/v1/users", {"name": "Bob", "email": user["email"]})
    assert 409 == reply.status
    assert "conflict" == reply.error["code"]
    assert user["email"] in reply.error["message"]
    other = service.user()
    patch = service.call("PATCH", f"/v1/users/{other['id']}", {"email": user["email"]})
    assert 409 == patch.status


def test_unknown_users_and_teams_are_404s(service: Service) -> None:
    """Every route taking a user id answers 404 for an unknown one; so does an unknown team."""
    for method, path in [
        ("GET", "/v1/users/usr_nope"),
        ("PATCH", "/v1/users/usr_nope"),
        ("POST", "/v1/users/usr_nope/disable"),
        ("GET", "/v1/users/usr_nope/usage"),
        ("POST", "/v1/users/usr_nope/usage/reset"),
    ]:
        reply = service.call(method, path, {} if method == "PATCH" else None)
        assert 404 == reply.status, (method, path, reply.body)
        assert "not_found_error" == reply.error["type"]
    body = {"name": "Ada", "email": f"{uuid.uuid4().hex}@example.com", "team_id": "team_nope"}
    assert 404 == service.call("POST", "/v1/users", body).status
    assert 404 == service.check("usr_nope").status


def test_a_user_is_updated_field_by_field(service: Service) -> None:
    """PATCH changes only the fields given; tier changes the effective limits."""
    user = service.user()
    team = service.call("POST", "/v1/teams", {"name": f"t-{uuid.uuid4().hex[:8]}"}).json()
    reply = service.call(
        "PATCH",
        f"/v1/users/{user['id']}",
        {"name": "Ada L.", "tier": "tiny", "team_id": team["id"]},
    )
    assert 200 == reply.status, reply.body
    changed = reply.json()
    assert ("Ada L.", "tiny", team["id"]) == (changed["name"], changed["tier"], changed["team_id"])
    assert user["email"] == changed["email"]
    assert 3 == changed["limits"]["requests_per_minute"]
    assert changed == service.call("PATCH", f"/v1/users/{user['id']}").json()  # no body: no change


def test_overrides_are_merged_and_removed_by_default(service: Service) -> None:
    """Overrides merge into the user's: a number sets, null removes the limit, "default" goes
    back to the tier's; the effective limits follow."""
    user = service.user()
    path = f"/v1/users/{user['id']}"
    first = service.call(
        "PATCH", path, {"overrides": {"tokens_per_day": 50, "cost_per_month_usd": 0.25}}
    ).json()
    assert {"tokens_per_day": 50.0, "cost_per_month_usd": 0.25} == first["overrides"]
    assert (50, 0.25) == (first["limits"]["tokens_per_day"], first["limits"]["cost_per_month_usd"])
    second = service.call(
        "PATCH", path, {"overrides": {"tokens_per_day": "default", "concurrent_requests": None}}
    ).json()
    assert {"cost_per_month_usd": 0.25, "concurrent_requests": None} == second["overrides"]
    assert (10000, None) == (
        second["limits"]["tokens_per_day"],
        second["limits"]["concurrent_requests"],
    )


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"status": "gone"}, "status"),
        ({"tier": "gold"}, "tier"),
        ({"overrides": {"tokens_per_year": 5}}, "overrides.tokens_per_year"),
        ({"overrides": {"tokens_per_day": -1}}, "overrides.tokens_per_day"),
        ({"overrides": {"tokens_per_day": 1.5}}, "overrides.tokens_per_day"),
        ({"overrides": {"cost_per_month_usd": "lots"}}, "overrides.cost_per_month_usd"),
        ({"overrides": [1]}, "overrides"),
        ({"email": "nobody"}, "email"),
        ({"id": "usr_other"}, "id"),
    ],
)
def test_a_bad_update_is_a_400_naming_the_field(
    service: Service, body: dict[str, object], param: str
) -> None:
    """Each bad field of a PATCH is a 400 naming it, and nothing is changed."""
    user = service.user()
    reply = service.call("PATCH", f"/v1/users/{user['id']}", body)
    assert 400 == reply.status, reply.body
    assert param == reply.error["param"]
    assert user == service.call("GET", f"/v1/users/{user['id']}").json()


@pytest.mark.parametrize(
    ("limit", "value"),
    [
        ("tokens_per_day", 1e300),
        ("tokens_per_month", 10**13),
        ("tokens_per_minute", 10**11),
        ("cost_per_month_usd", 1e300),
    ],
)
def test_an_override_beyond_its_bound_is_a_400_and_the_user_stays_readable(
    service: Service, limit: str, value: float
) -> None:
    """Issue 16 defect 5: an override too large to encode or to count (1e300) is refused with a
    400 naming it, so every read of the user keeps working."""
    user = service.user()
    reply = service.call("PATCH", f"/v1/users/{user['id']}", {"overrides": {limit: value}})
    assert (400, f"overrides.{limit}") == (reply.status, reply.error["param"]), reply.body
    assert 200 == service.call("GET", f"/v1/users/{user['id']}").status
    assert 200 == service.call("GET", "/v1/users").status
    assert 200 == service.call("GET", f"/v1/users/{user['id']}/usage").status


def test_a_disabled_user_is_refused_by_check(service: Service) -> None:
    """Disabling a user shows in the record, and /v1/check answers 403 for them."""
    user = service.user()
    reply = service.call("POST", f"/v1/users/{user['id']}/disable")
    assert (200, "disabled") == (reply.status, reply.json()["status"])
    refused = service.check(user["id"])
    assert (403, "user_disabled") == (refused.status, refused.error["code"])
    service.call("PATCH", f"/v1/users/{user['id']}", {"status": "active"})
    assert 200 == service.check(user["id"]).status


def test_a_deleted_user_loses_their_keys_and_keeps_their_record(service: Service) -> None:
    """Issue 18 item 5: DELETE /v1/users/{id} marks the user deleted and disabled and revokes
    every key of theirs; they leave the listing but are still found by id (the ledger's rows
    name them so), cannot be changed or given a key (409), and are refused by /v1/check."""
    team = service.call("POST", "/v1/teams", {"name": f"del-{uuid.uuid4().hex[:8]}"}).json()
    user = service.user(team_id=team["id"])
    other = service.user(team_id=team["id"])
    keys = [service.call("POST", "/v1/keys", {"user_id": user["id"]}).json() for _ in range(2)]
    theirs = service.call("POST", "/v1/keys", {"user_id": other["id"]}).json()
    assert 200 == service.check(user["id"]).status
    reply = service.call("DELETE", f"/v1/users/{user['id']}")
    assert 200 == reply.status, reply.body
    deleted = reply.json()
    assert ("disabled", user["name"], user["email"]) == (
        deleted["status"],
        deleted["name"],
        deleted["email"],
    )
    assert deleted["deleted_at"] is not None
    listed = service.call("GET", f"/v1/keys?user_id={user['id']}").json()["data"]
    assert {k["id"]: "revoked" for k in keys} == {k["id"]: k["status"] for k in listed}
    assert all(k["revoked_at"] is not None for k in listed)
    other_keys = service.call("GET", f"/v1/keys?user_id={other['id']}").json()["data"]
    assert [(theirs["id"], "active")] == [(k["id"], k["status"]) for k in other_keys]
    members = service.call("GET", f"/v1/users?team_id={team['id']}").json()["data"]
    assert [other["id"]] == [u["id"] for u in members]
    assert deleted == service.call("GET", f"/v1/users/{user['id']}").json()
    changed = service.call("PATCH", f"/v1/users/{user['id']}", {"name": "Back"})
    assert (409, "conflict") == (changed.status, changed.error["code"])
    assert "deleted" in changed.error["message"]
    assert 409 == service.call("POST", "/v1/keys", {"user_id": user["id"]}).status
    assert 403 == service.check(user["id"]).status
    again = service.call("DELETE", f"/v1/users/{user['id']}").json()
    assert deleted["deleted_at"] == again["deleted_at"]
    assert 404 == service.call("DELETE", "/v1/users/usr_nope").status


def test_a_team_is_renamed_unless_the_name_is_taken_and_deleted_once_empty(
    service: Service,
) -> None:
    """Issue 18 item 5: PATCH /v1/teams/{id} renames a team (a taken name is a 409, an empty
    one a 400); DELETE refuses a team with members (409), then deletes it: it leaves the
    listing, is still found by id, and its name stays taken."""
    run = uuid.uuid4().hex[:8]
    first = service.call("POST", "/v1/teams", {"name": f"first-{run}"}).json()
    second = service.call("POST", "/v1/teams", {"name": f"second-{run}"}).json()
    taken = service.call("PATCH", f"/v1/teams/{first['id']}", {"name": f"second-{run}"})
    assert (409, "conflict") == (taken.status, taken.error["code"])
    assert f"second-{run}" in taken.error["message"]
    empty = service.call("PATCH", f"/v1/teams/{first['id']}", {"name": " "})
    assert (400, "name") == (empty.status, empty.error["param"])
    renamed = service.call("PATCH", f"/v1/teams/{first['id']}", {"name": f" renamed-{run} "})
    assert (200, f"renamed-{run}", first["id"]) == (
        renamed.status,
        renamed.json()["name"],
        renamed.json()["id"],
    )
    assert 404 == service.call("PATCH", "/v1/teams/team_nope", {"name": "x"}).status
    member = service.user(team_id=second["id"])
    busy = service.call("DELETE", f"/v1/teams/{second['id']}")
    assert (409, "conflict") == (busy.status, busy.error["code"])
    assert "1 member" in busy.error["message"]
    assert 200 == service.call("DELETE", f"/v1/users/{member['id']}").status
    gone = service.call("DELETE", f"/v1/teams/{second['id']}")
    assert 200 == gone.status, gone.body
    assert gone.json()["deleted_at"] is not None
    names = {t["name"] for t in service.call("GET", "/v1/teams").json()["data"]}
    assert f"renamed-{run}" in names
    assert f"second-{run}" not in names
    assert gone.json() == service.call("GET", f"/v1/teams/{second['id']}").json()
    assert 409 == service.call("POST", "/v1/teams", {"name": f"second-{run}"}).status
    assert 409 == service.call("PATCH", f"/v1/teams/{second['id']}", {"name": "z"}).status
    assert 404 == service.call("DELETE", "/v1/teams/team_nope").status
    assert 404 == service.call("GET", "/v1/teams/team_nope").status


# -- keys --------------------------------------------------------------------------------------


def test_a_new_keys_secret_is_shown_once_and_never_listed(service: Service) -> None:
    """POST /v1/keys returns the secret; listings and revocation never show it again."""
    user = service.user()
    reply = service.call("POST", "/v1/keys", {"user_id": user["id"], "name": "ci"})
    assert 201 == reply.status, reply.body
    key = reply.json()
    secret = key["secret"]
    assert secret.startswith(key["prefix"])
    assert ("ci", "active", user["id"]) == (key["name"], key["status"], key["user_id"])
    assert "only time" in key["warning"]
    everything = service.call("GET", "/v1/keys")
    mine = service.call("GET", f"/v1/keys?user_id={user['id']}")
    revoked = service.call("POST", f"/v1/keys/{key['id']}/revoke")
    for later in (everything, mine, revoked):
        assert 200 == later.status
        assert secret.encode() not in later.body
        assert b'"secret"' not in later.body
    assert [key["id"]] == [k["id"] for k in mine.json()["data"]]
    assert "revoked" == revoked.json()["status"]
    assert revoked.json()["revoked_at"] is not None
    listed = service.call("GET", f"/v1/keys?user_id={user['id']}").json()["data"]
    assert ["revoked"] == [k["status"] for k in listed]


def test_a_key_can_expire_and_defaults_its_name(service: Service) -> None:
    """expires_in_days sets expires_at that many days ahead; the name defaults to "default"."""
    user = service.user()
    key = service.call("POST", "/v1/keys", {"user_id": user["id"], "expires_in_days": 30}).json()
    assert "default" == key["name"]
    created = time.time()
    expires = key["expires_at"].replace("Z", "+00:00")
    ahead = datetime.fromisoformat(expires).timestamp() - created
    assert 30 * 86400 - 60 < ahead <= 30 * 86400 + 60


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "user_id"),
        ({"user_id": "x", "expires_in_days": 0}, "expires_in_days"),
        ({"user_id": "x", "expires_in_days": "soon"}, "expires_in_days"),
        ({"user_id": "x", "name": ""}, "name"),
        ({"user_id": "x", "secret": "mine"}, "secret"),
    ],
)
def test_a_bad_new_key_is_a_400_naming_the_field(
    service: Service, body: dict[str, object], param: str
) -> None:
    """Each bad field of a new key is a 400 naming it."""
    reply = service.call("POST", "/v1/keys", body)
    assert (400, param) == (reply.status, reply.error["param"])


def test_keys_of_unknown_users_and_unknown_keys_are_404s(service: Service) -> None:
    """A key for an unknown user, the keys of one, and revoking an unknown key: 404s."""
    assert 404 == service.call("POST", "/v1/keys", {"user_id": "usr_nope"}).status
    assert 404 == service.call("GET", "/v1/keys?user_id=usr_nope").status
    assert 404 == service.call("POST", "/v1/keys/key_nope/revoke").status


def test_a_key_is_created_with_limits_of_its_own(service: Service) -> None:
    """POST /v1/keys takes a key's own budget, models, per-minute limits and expiry time, and
    every listing shows them; an unknown model, a past or offset-less time, or both expiries
    are 400s naming the field."""
    user = service.user()
    body = {
        "user_id": user["id"],
        "budget_usd": 2.5,
        "models": [" chat"],
        "requests_per_minute": 10,
        "tokens_per_minute": 5000,
        "expires_at": "2099-01-31T00:00:00Z",
    }
    reply = service.call("POST", "/v1/keys", body)
    assert 201 == reply.status, reply.body
    made = reply.json()
    own = ("budget_usd", "models", "requests_per_minute", "tokens_per_minute")
    expected = {"budget_usd": 2.5, "models": ["chat"], "requests_per_minute": 10}
    expected["tokens_per_minute"] = 5000
    assert expected == {k: made[k] for k in own}
    assert "2099-01-31T00:00:00Z" == made["expires_at"]
    (listed,) = service.call("GET", f"/v1/keys?user_id={user['id']}").json()["data"]
    assert expected == {k: listed[k] for k in own}
    plain = service.call("POST", "/v1/keys", {"user_id": user["id"]}).json()
    assert dict.fromkeys(own) == {k: plain[k] for k in own}
    for bad, param in (
        ({"models": ["gpt-9"]}, "models[0]"),
        ({"models": []}, "models"),
        ({"expires_at": "2001-01-01T00:00:00Z"}, "expires_at"),
        ({"expires_at": "2099-01-01T00:00:00"}, "expires_at"),
        ({"expires_at": "2099-01-01T00:00:00Z", "expires_in_days": 3}, "expires_at"),
        ({"budget_usd": -1}, "budget_usd"),
        ({"requests_per_minute": 1.5}, "requests_per_minute"),
    ):
        refused = service.call("POST", "/v1/keys", {"user_id": user["id"], **bad})
        assert (400, param) == (refused.status, refused.error["param"]), (bad, refused.body)
    assert 2 == len(service.call("GET", f"/v1/keys?user_id={user['id']}").json()["data"])


def test_a_team_budget_is_set_shown_and_charged_by_every_members_check(service: Service) -> None:
    """PUT sets a team's budget; each member's check charges it, the one that would pass it is
    a 429 naming the team; GET shows budget, spent and remaining; reconcile returns the unused
    part; clearing it lets checks through again."""
    team = service.call("POST", "/v1/teams", {"name": f"t-{uuid.uuid4().hex}"}).json()
    path = f"/v1/teams/{team['id']}/budget"
    empty = service.call("GET", path)
    assert 200 == empty.status, empty.body
    assert (None, None) == (empty.json()["budget_usd"], empty.json()["spent_usd"])
    set_reply = service.call("PUT", path, {"budget_usd": 0.001})
    assert 200 == set_reply.status, set_reply.body
    assert (0.001, 0.0, 0.001) == tuple(
        set_reply.json()[k] for k in ("budget_usd", "spent_usd", "remaining_usd")
    )
    alice, bob = service.user(team_id=team["id"]), service.user(team_id=team["id"])
    first = service.check(alice["id"], cost_usd=0.0006)
    assert 200 == first.status, first.body
    assert (200, None) == (service.check(bob["id"], cost_usd=0.0004).status, None)
    refused = service.check(bob["id"], cost_usd=0.000001)
    assert 429 == refused.status, refused.body
    assert ("cost_per_month", "team") == (
        refused.json()["refused_by"],
        refused.json()["refused_scope"],
    )
    assert refused.error["message"].startswith("Team budget reached"), refused.error
    shown = service.call("GET", path).json()
    assert (0.001, 0.001, 0.0) == (shown["budget_usd"], shown["spent_usd"], shown["remaining_usd"])
    assert team["name"] == shown["name"]
    settled = service.call(
        "POST",
        "/v1/reconcile",
        {"reservation": first.json()["reservation"], "tokens": 0, "cost_usd": 0.0001},
    )
    assert 204 == settled.status, settled.body
    assert 0.0005 == service.call("GET", path).json()["spent_usd"]
    listed = {t["id"]: t for t in service.call("GET", "/v1/teams").json()["data"]}
    assert 0.001 == listed[team["id"]]["budget_usd"]
    cleared = service.call("PUT", path, {"budget_usd": None}).json()
    assert (None, None) == (cleared["budget_usd"], cleared["spent_usd"])
    assert 200 == service.check(bob["id"], cost_usd=1.0).status


def test_team_budgets_of_unknown_teams_and_bad_amounts(service: Service) -> None:
    """An unknown team is a 404 on GET and PUT; a negative or missing amount a 400."""
    assert 404 == service.call("GET", "/v1/teams/team_nope/budget").status
    assert 404 == service.call("PUT", "/v1/teams/team_nope/budget", {"budget_usd": 1}).status
    team = service.call("POST", "/v1/teams", {"name": f"t-{uuid.uuid4().hex}"}).json()
    for body in ({"budget_usd": -1}, {}, {"budget_usd": "lots"}):
        reply = service.call("PUT", f"/v1/teams/{team['id']}/budget", body)
        assert (400, "budget_usd") == (reply.status, reply.error["param"]), reply.body


# -- tiers, usage, check and reconcile ---------------------------------------------------------


def test_tiers_are_listed_with_their_limits(service: Service) -> None:
    """GET /v1/tiers lists the configured tiers, their limits, models and the default."""
    tiers = {t["name"]: t for t in service.call("GET", "/v1/tiers").json()["data"]}
    assert ["tiny", "pair", "open"] == list(tiers)
    assert (3, 1000, None) == (
        tiers["tiny"]["limits"]["requests_per_minute"],
        tiers["tiny"]["limits"]["tokens_per_minute"],
        tiers["tiny"]["limits"]["tokens_per_day"],
    )
    assert 1.5 == tiers["pair"]["limits"]["cost_per_month_usd"]
    assert [False, True, False] == [t["default"] for t in tiers.values()]
    assert ["*"] == tiers["open"]["models"]


def test_checks_are_admitted_until_the_limit_then_429_with_headers(service: Service) -> None:
    """Three requests a minute pass with falling x-ratelimit-remaining; the fourth is a 429
    with retry-after and a message naming the limit and its value."""
    user = service.user("tiny")
    remaining = []
    for _ in range(3):
        reply = service.check(user["id"], tokens=100)
        assert 200 == reply.status, reply.body
        assert reply.json()["allowed"] is True
        assert reply.json()["reservation"]["principal"] == user["id"]
        assert "3" == reply.headers["x-ratelimit-limit-requests"]
        assert "1000" == reply.headers["x-ratelimit-limit-tokens"]
        assert "retry-after" not in reply.headers
        remaining.append(reply.headers["x-ratelimit-remaining-requests"])
    assert ["2", "1", "0"] == remaining
    refused = service.check(user["id"], tokens=100)
    assert 429 == refused.status
    doc = refused.json()
    assert (False, "requests_per_minute", None) == (
        doc["allowed"],
        doc["refused_by"],
        doc["reservation"],
    )
    assert 1 <= int(refused.headers["retry-after"]) <= 20
    assert "0" == refused.headers["x-ratelimit-remaining-requests"]
    assert refused.headers["x-ratelimit-reset-requests"].endswith("s")
    message = refused.error["message"]
    assert "requests per minute (limit 3)" in message
    assert "try again in" in message
    assert "rate_limit_exceeded" == refused.error["type"]


def test_a_request_over_the_token_rate_is_refused_by_tokens(service: Service) -> None:
    """More tokens than the per-minute budget: refused by tokens_per_minute."""
    user = service.user("tiny")
    refused = service.check(user["id"], tokens=1001)
    assert (429, "tokens_per_minute") == (refused.status, refused.json()["refused_by"])
    assert (
        "tokens per minute (limit 1000): this request asks for more tokens"
        in (refused.error["message"])
    )


def test_reconcile_frees_a_concurrency_slot(service: Service) -> None:
    """With two slots taken a third check is refused; reconciling one lets the next in."""
    user = service.user("pair")
    first = service.check(user["id"], tokens=100, cost_usd=0.01).json()
    second = service.check(user["id"], tokens=100).json()
    assert first["allowed"]
    assert second["allowed"]
    refused = service.check(user["id"])
    assert (429, "concurrent_requests") == (refused.status, refused.json()["refused_by"])
    assert "concurrent requests (limit 2)" in refused.error["message"]
    reply = service.call(
        "POST",
        "/v1/reconcile",
        {"reservation": first["reservation"], "tokens": 40, "cost_usd": 0.004},
    )
    assert 204 == reply.status, reply.body
    assert b"" == reply.body
    assert 200 == service.check(user["id"]).status


def test_usage_shows_used_remaining_and_reset_then_is_reset(service: Service) -> None:
    """Usage counts reservations and reconciled actuals; a reset forgets them."""
    user = service.user("pair")
    lease = service.check(user["id"], tokens=300, cost_usd=0.5, lease_id="lease-1").json()
    assert "lease-1" == lease["reservation"]["lease_id"]
    service.check(user["id"], tokens=200)
    service.call(
        "POST",
        "/v1/reconcile",
        {"reservation": lease["reservation"], "tokens": 100, "cost_usd": 0.25},
    )
    reply = service.call("GET", f"/v1/users/{user['id']}/usage")
    assert 200 == reply.status
    doc = reply.json()
    assert (user["id"], "pair") == (doc["user_id"], doc["tier"])
    usage = {u["name"]: u for u in doc["limits"]}
    assert ["requests_per_minute", "concurrent_requests", "tokens_per_day", "cost_per_month"] == [
        u["name"] for u in doc["limits"]
    ]
    assert (2, 998) == (
        usage["requests_per_minute"]["used"],
        usage["requests_per_minute"]["remaining"],
    )
    assert (1, 1) == (
        usage["concurrent_requests"]["used"],
        usage["concurrent_requests"]["remaining"],
    )
    assert (300, 9700, "tokens") == (
        usage["tokens_per_day"]["used"],
        usage["tokens_per_day"]["remaining"],
        usage["tokens_per_day"]["unit"],
    )
    assert (0.25, 1.25, "usd") == (
        usage["cost_per_month"]["used"],
        usage["cost_per_month"]["remaining"],
        usage["cost_per_month"]["unit"],
    )
    assert 0 < usage["tokens_per_day"]["resets_in"] <= 86_400
    assert usage["tokens_per_day"]["reset_at"].endswith("Z")
    reset = service.call("POST", f"/v1/users/{user['id']}/usage/reset")
    assert 200 == reset.status
    assert [0, 0, 0, 0] == [u["used"] for u in reset.json()["limits"]]


def test_reconcile_without_a_cost_keeps_the_cost_reserved(service: Service) -> None:
    """cost_usd left out of a reconciliation settles the cost at what was reserved."""
    user = service.user("pair")
    lease = service.check(user["id"], tokens=10, cost_usd=0.75).json()
    reply = service.call(
        "POST", "/v1/reconcile", {"reservation": lease["reservation"], "tokens": 10}
    )
    assert 204 == reply.status
    usage = service.call("GET", f"/v1/users/{user['id']}/usage").json()
    assert [0.75] == [u["used"] for u in usage["limits"] if u["name"] == "cost_per_month"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tokens": 1}, "user_id"),
        ({"user_id": "usr_x"}, "tokens"),
        ({"user_id": "usr_x", "tokens": -1}, "tokens"),
        ({"user_id": "usr_x", "tokens": True}, "tokens"),
        ({"user_id": "usr_x", "tokens": 1, "cost_usd": -0.5}, "cost_usd"),
        ({"user_id": "usr_x", "tokens": 1, "lease_id": ""}, "lease_id"),
        ({"user_id": "usr_x", "tokens": 1, "model": "m"}, "model"),
    ],
)
def test_a_bad_check_is_a_400_naming_the_field(
    service: Service, body: dict[str, object], param: str
) -> None:
    """Each bad field of a check is a 400 naming it."""
    reply = service.call("POST", "/v1/check", body)
    assert (400, param) == (reply.status, reply.error["param"]), reply.body


def test_a_bad_reconciliation_is_a_400_naming_the_field(service: Service) -> None:
    """A missing reservation, or a reservation with a bad field, is a 400 naming it."""
    user = service.user("pair")
    reservation = service.check(user["id"]).json()["reservation"]
    cases = [
        ({"tokens": 1}, "reservation"),
        ({"reservation": reservation}, "tokens"),
        ({"reservation": reservation | {"tokens": "ten"}, "tokens": 1}, "reservation.tokens"),
        ({"reservation": {"lease_id": "x"}, "tokens": 1}, "reservation.principal"),
        ({"reservation": reservation | {"extra": 1}, "tokens": 1}, "reservation.extra"),
        ({"reservation": reservation, "tokens": 1, "cost_usd": "x"}, "cost_usd"),
    ]
    for body, param in cases:
        reply = service.call("POST", "/v1/reconcile", body)
        assert (400, param) == (reply.status, reply.error["param"]), (body, reply.body)
    stranger = reservation | {"principal": "usr_nope"}
    reply = service.call("POST", "/v1/reconcile", {"reservation": stranger, "tokens": 1})
    assert (404, "reservation.principal") == (reply.status, reply.error["param"])


# -- stores that cannot be reached -------------------------------------------------------------


def _start_answering(args: list[str], port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start the service and wait until /health answers at all (it may say 503)."""
    proc = subprocess.Popen(
        args,
        env={**os.environ, **env},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            Service(port).call("GET", "/health", key=None)
            return proc
        except OSError:
            time.sleep(0.05)
    stop_process(proc)
    raise RuntimeError("the service did not answer /health within 15 s")


def test_an_unreachable_limiter_is_a_503_and_degrades_health(tmp_path: Path) -> None:
    """With Redis unreachable the service starts degraded; check and usage are 503s naming it,
    while the accounts routes keep working."""
    config = _config(
        tmp_path, f"sqlite+aiosqlite:///{tmp_path / 'a.db'}", f"redis://127.0.0.1:{free_port()}/0"
    )
    port = free_port()
    proc = start_process(_command(config, port), port, env=ENV)
    try:
        service = Service(port)
        health = service.call("GET", "/health", key=None).json()
        assert ("degraded", "down", "ok") == (
            health["status"],
            health["dependencies"]["limiter"]["status"],
            health["dependencies"]["accounts"]["status"],
        )
        user = service.user()
        reply = service.check(user["id"])
        assert 503 == reply.status, reply.body
        assert "service_unavailable" == reply.error["type"]
        assert "limits store (Redis) is unavailable" in reply.error["message"]
        assert 503 == service.call("GET", f"/v1/users/{user['id']}/usage").status
    finally:
        assert 0 == stop_process(proc), process_output(proc)


def test_an_unreachable_accounts_database_is_a_503_and_takes_health_down(tmp_path: Path) -> None:
    """With PostgreSQL unreachable /health is 503 (accounts are critical) and routes are 503s."""
    config = _config(tmp_path, f"postgresql://postgres@127.0.0.1:{free_port()}/citadel")
    port = free_port()
    proc = _start_answering(_command(config, port), port, ENV)
    try:
        service = Service(port)
        health = service.call("GET", "/health", key=None)
        assert 503 == health.status
        assert "down" == health.json()["dependencies"]["accounts"]["status"]
        for method, path in [("GET", "/v1/users"), ("POST", "/v1/check")]:
            reply = service.call(method, path, {"user_id": "usr_x", "tokens": 1})
            assert 503 == reply.status, reply.body
            assert "accounts database is unavailable" in reply.error["message"]
        assert 401 == service.call("GET", "/v1/users", key="sk-wrong").status
    finally:
        stop_process(proc)


# -- PostgreSQL --------------------------------------------------------------------------------


@pytest.fixture
def postgres_database() -> Iterator[str]:
    """A fresh, migrated PostgreSQL database, dropped afterwards."""
    with scratch_postgres(prepare=ACCOUNTS.upgrade) as uri:
        yield uri


def test_on_postgresql_users_keys_and_checks_work(tmp_path: Path, postgres_database: str) -> None:
    """The same service on PostgreSQL: a user, a key shown once, checks until a 429, usage."""
    port = free_port()
    proc = start_process(_command(_config(tmp_path, postgres_database), port), port, env=ENV)
    try:
        service = Service(port)
        health = service.call("GET", "/health", key=None).json()
        assert "postgresql" == health["dependencies"]["accounts"]["detail"]
        user = service.user("tiny")
        key = service.call("POST", "/v1/keys", {"user_id": user["id"]})
        assert 201 == key.status
        assert key.json()["secret"].encode() not in service.call("GET", "/v1/keys").body
        statuses = [service.check(user["id"]).status for _ in range(4)]
        assert [200, 200, 200, 429] == statuses
        usage = service.call("GET", f"/v1/users/{user['id']}/usage").json()
        assert 3 == usage["limits"][0]["used"]
        assert (
            409 == service.call("POST", "/v1/users", {"name": "B", "email": user["email"]}).status
        )
        deleted = service.call("DELETE", f"/v1/users/{user['id']}")
        assert (200, "disabled") == (deleted.status, deleted.json()["status"])
        (revoked,) = service.call("GET", f"/v1/keys?user_id={user['id']}").json()["data"]
        assert "revoked" == revoked["status"]
    finally:
        assert 0 == stop_process(proc), process_output(proc)


def test_with_the_in_memory_limiter_usage_and_reset_say_409(tmp_path: Path) -> None:
    """Under memory:// the gateway's counters live in the gateway's process: rather than show 0
    and answer a reset that clears nothing, usage and reset are a 409 that says why (defect 11)."""
    config = _config(tmp_path, f"sqlite+aiosqlite:///{tmp_path / 'a.db'}", redis="memory://")
    port = free_port()
    proc = start_process(_command(config, port), port, env=ENV)
    try:
        service = Service(port, Conformance.fetch("127.0.0.1", port))
        user = service.user()
        usage = service.call("GET", f"/v1/users/{user['id']}/usage")
        reset = service.call("POST", f"/v1/users/{user['id']}/usage/reset")
        assert (409, 409) == (usage.status, reset.status)
        assert "limiter_not_shared" == usage.error["code"] == reset.error["code"]
        assert "limits.backend" in usage.error["message"]
        assert 200 == service.call("GET", f"/v1/users/{user['id']}").status
    finally:
        output = process_output(proc)
        assert 0 == stop_process(proc), output


def test_check_with_a_key_charges_the_keys_own_limits(service: Service) -> None:
    """/v1/check with `key_id` applies the key's own limits as the gateway does: the key's
    2 requests a minute refuse the third check (429 naming the key) while the same user
    without the key is admitted; reconcile settles the key's reservation; another user's,
    a revoked or an unknown key is refused."""
    user = service.user(tier="open")
    key = service.call("POST", "/v1/keys", {"user_id": user["id"], "requests_per_minute": 2}).json()
    admitted = [service.check(user["id"], key_id=key["id"]) for _ in range(2)]
    assert [200, 200] == [reply.status for reply in admitted], admitted[-1].body
    assert key["id"] == admitted[0].json()["reservation"]["key_id"]
    refused = service.check(user["id"], key_id=key["id"])
    assert 429 == refused.status, refused.body
    assert ("requests_per_minute", "key") == (
        refused.json()["refused_by"],
        refused.json()["refused_scope"],
    )
    assert 200 == service.check(user["id"]).status  # the user's own limits: none
    settled = service.call(
        "POST", "/v1/reconcile", {"reservation": admitted[0].json()["reservation"], "tokens": 5}
    )
    assert 204 == settled.status, settled.body
    other = service.user(tier="open")
    assert (404, "key_id") == (
        (reply := service.check(other["id"], key_id=key["id"])).status,
        reply.error["param"],
    )
    assert 200 == service.call("POST", f"/v1/keys/{key['id']}/revoke").status
    revoked = service.check(user["id"], key_id=key["id"])
    assert (403, "key_revoked") == (revoked.status, revoked.error["code"]), revoked.body
