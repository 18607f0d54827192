"""``citadel migrate``, ``teams``, ``users`` and ``keys`` as an operator runs them: subprocesses
on an SQLite database named by the settings file in ``CITADEL_CONFIG``."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from citadel.accounts.sql import open_store

from support import free_port

SETTING_PREFIXES = ("CITADEL_", "SQL_DATABASE_", "REDIS_", "SERVER_")


class Citadel:
    """Runs ``python -m citadel ARGS`` with one settings file."""

    def __init__(self, config: Path) -> None:
        self.config = config

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(SETTING_PREFIXES)}
        result = subprocess.run(
            [sys.executable, "-m", "citadel", *args],
            cwd=self.config.parent,
            env={**env, "CITADEL_CONFIG": str(self.config)},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert "Traceback" not in result.stderr, result.stderr
        return result

    def ok(self, *args: str) -> str:
        """The output of a command that must succeed."""
        result = self(*args)
        assert 0 == result.returncode, result.stderr
        return result.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "--json"))


def _settings(path: Path, database: str) -> Path:
    path.write_text(f'accounts:\n  database: "{database}"\n', encoding="utf-8")
    return path


@pytest.fixture
def database(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'a.db'}"


@pytest.fixture
def citadel(tmp_path: Path, database: str) -> Citadel:
    return Citadel(_settings(tmp_path / "citadel.yaml", database))


def one_line(text: str) -> str:
    lines = text.splitlines()
    assert 1 == len(lines), text
    return lines[0]


def test_migrate_creates_the_tables_once(citadel: Citadel) -> None:
    """The first migrate upgrades from empty; the second says the database is already at head."""
    assert "upgraded from empty to revision 0004" in citadel.ok("migrate")
    assert "already at revision 0004" in citadel.ok("migrate")
    assert {"before": "0004", "after": "0004"}.items() <= citadel.json("migrate").items()


def test_teams_and_users_are_created_listed_updated_and_disabled(citadel: Citadel) -> None:
    """The user lifecycle through the command line, in tables and in JSON."""
    team = citadel.json("teams", "create", "research")
    assert "research" in citadel.ok("teams", "list")
    assert [team] == citadel.json("teams", "list")
    assert team["budget_micros"] is None
    budgeted = citadel.json("teams", "budget", "research", "--usd", "250.5")
    assert 250_500_000 == budgeted["budget_micros"]
    assert [budgeted] == citadel.json("teams", "list")
    assert citadel.json("teams", "budget", team["id"], "--none")["budget_micros"] is None

    created = citadel.json(
        "users", "create", "--name", "Ann", "--email", "ann@example.com", "--team", "research"
    )
    assert {"name": "Ann", "email": "ann@example.com", "team_id": team["id"]}.items() <= (
        created.items()
    )
    assert ("free", "active", {}) == (created["tier"], created["status"], created["overrides"])
    other = citadel.json("users", "create", "--name", "Bob", "--email", "bob@example.com")
    table = citadel.ok("users", "list")
    assert "ann@example.com" in table
    assert "bob@example.com" in table
    assert [created] == citadel.json("users", "list", "--team", team["id"])
    assert [created, other] == citadel.json("users", "list")

    updated = citadel.json(
        "users",
        "update",
        created["id"],
        "--tier",
        "premium",
        "--override",
        "requests_per_minute=100",
        "tokens_per_day=unlimited",
    )
    assert "premium" == updated["tier"]
    assert {"requests_per_minute": 100.0, "tokens_per_day": None} == updated["overrides"]
    updated = citadel.json(
        "users", "update", created["id"], "--override", "tokens_per_day=default", "--name", "A."
    )
    assert ("A.", {"requests_per_minute": 100.0}) == (updated["name"], updated["overrides"])
    assert "requests_per_minute=100" in citadel.ok("users", "update", created["id"])

    assert "disabled" in citadel.ok("users", "disable", created["id"])
    assert "disabled" == citadel.json("users", "list", "--team", "research")[0]["status"]
    assert (
        "active" == citadel.json("users", "update", created["id"], "--status", "active")["status"]
    )


def test_users_and_teams_are_renamed_and_deleted(citadel: Citadel) -> None:
    """Issue 18 item 5 on the command line: `teams rename` (a taken name: one line, exit 2),
    `users rename`, `users delete` (their keys revoked, the user kept by id but gone from the
    listing), and `teams delete` (refused while the team has members)."""
    team = citadel.json("teams", "create", "research")
    citadel.json("teams", "create", "platform")
    taken = citadel("teams", "rename", "research", "platform")
    assert 2 == taken.returncode
    assert "'platform' exists already" in one_line(taken.stderr)
    renamed = citadel.json("teams", "rename", "research", "science")
    assert ("science", team["id"]) == (renamed["name"], renamed["id"])
    user = citadel.json(
        "users", "create", "--name", "Ann", "--email", "ann@example.com", "--team", "science"
    )
    assert "Anna" == citadel.json("users", "rename", user["id"], "Anna")["name"]
    citadel.json("keys", "create", "--user", user["id"])
    busy = citadel("teams", "delete", "science")
    assert 2 == busy.returncode
    assert "1 member" in one_line(busy.stderr)
    deleted = citadel.json("users", "delete", user["id"])
    assert ("disabled", "Anna") == (deleted["status"], deleted["name"])
    assert deleted["deleted_at"] is not None
    assert "deleted" in citadel.ok("users", "delete", user["id"])
    assert [] == citadel.json("users", "list")
    (key,) = citadel.json("keys", "list", "--user", user["id"])
    assert key["revoked_at"] is not None
    gone = citadel.json("teams", "delete", "science")
    assert gone["deleted_at"] is not None
    assert ["platform"] == [t["name"] for t in citadel.json("teams", "list")]


def test_a_key_secret_is_shown_once_and_works(citadel: Citadel, database: str) -> None:
    """keys create prints the secret once with a warning; listings never show it; revoke sticks."""
    user = citadel.json("users", "create", "--name", "Ann", "--email", "ann@example.com")
    created = citadel("keys", "create", "--user", user["id"], "--name", "ci", "--expires-days", "7")
    assert 0 == created.returncode
    assert "cannot be shown again" in created.stderr
    secret = next(w for w in created.stdout.split() if w.startswith("sk-cit-") and len(w) > 40)
    assert 1 == created.stdout.count(secret)
    as_json = citadel.json("keys", "create", "--user", user["id"])
    assert as_json["secret"].startswith(as_json["key"]["prefix"])

    async def find() -> Any:
        store = await open_store(database, migrate=False)
        try:
            return await store.find_key(hashlib.sha256(secret.encode()).digest())
        finally:
            await store.aclose()

    record = asyncio.run(find())
    assert record is not None
    assert ("ci", user["id"]) == (record.key.name, record.user.id)
    assert record.key.expires_at is not None

    listing = citadel.ok("keys", "list")
    listed = citadel.json("keys", "list", "--user", user["id"])
    for shown in (listing, json.dumps(listed)):
        assert secret not in shown
        assert as_json["secret"] not in shown
    assert [record.key.id, as_json["key"]["id"]] == [k["id"] for k in listed]
    assert "active" in listing

    revoked = citadel.json("keys", "revoke", record.key.id)
    assert revoked["revoked_at"] is not None
    assert "revoked" in citadel.ok("keys", "list", "--user", user["id"])


@pytest.mark.parametrize(
    ("args", "mentions"),
    [
        (["users", "update", "usr_nobody", "--tier", "free"], "usr_nobody"),
        (["users", "disable", "usr_nobody"], "usr_nobody"),
        (["users", "create", "--name", "X", "--email", "x@example.com", "--tier", "gold"], "gold"),
        (["users", "create", "--name", "X", "--email", "x@example.com", "--team", "t0"], "t0"),
        (["users", "update", "{user}", "--tier", "gold"], "gold"),
        (["users", "update", "{user}", "--override", "wings=2"], "wings"),
        (["users", "update", "{user}", "--override", "requests_per_minute=1.5"], "1.5"),
        (["users", "update", "{user}", "--override", "tokens_per_day=-3"], "-3"),
        (["users", "create", "--name", "Y", "--email", "ann@example.com"], "ann@example.com"),
        (["teams", "create", "ml"], "ml"),
        (["teams", "rename", "t0", "x"], "t0"),
        (["teams", "delete", "t0"], "t0"),
        (["users", "delete", "usr_nobody"], "usr_nobody"),
        (["users", "rename", "usr_nobody", "X"], "usr_nobody"),
        (["keys", "create", "--user", "usr_nobody"], "usr_nobody"),
        (["keys", "list", "--user", "usr_nobody"], "usr_nobody"),
        (["keys", "revoke", "key_nothing"], "key_nothing"),
    ],
)
def test_a_request_that_cannot_be_done_is_one_line_and_status_2(
    citadel: Citadel, database: str, args: list[str], mentions: str
) -> None:
    """Unknown ids, bad tiers or overrides and taken values: one line naming the value, exit 2."""

    async def seed() -> str:  # in this process: quicker than two more commands
        store = await open_store(database, migrate=True)
        try:
            await store.create_team("ml")
            user = await store.create_user(name="Ann", email="ann@example.com", tier="free")
        finally:
            await store.aclose()
        return user.id

    user_id = asyncio.run(seed())
    result = citadel(*(a.replace("{user}", user_id) for a in args))
    assert 2 == result.returncode
    assert mentions in one_line(result.stderr)
    assert "" == result.stdout


def test_an_unreachable_database_is_one_line_and_status_1(tmp_path: Path) -> None:
    """No PostgreSQL on the configured port: one line saying the store is unavailable, exit 1."""
    database = f"postgresql://postgres@127.0.0.1:{free_port()}/citadel"
    citadel = Citadel(_settings(tmp_path / "citadel.yaml", database))
    for args in (["users", "list"], ["migrate"]):
        result = citadel(*args)
        assert 1 == result.returncode
        assert "sql is unavailable" in one_line(result.stderr)


def test_the_commands_explain_themselves(citadel: Citadel) -> None:
    """--help names every action; a missing action is a one-line usage error."""
    assert all(a in citadel.ok("users", "--help") for a in ("create", "list", "update", "disable"))
    assert "--expires-days" in citadel.ok("keys", "create", "--help")
    result = citadel("keys")
    assert 2 == result.returncode
    assert "ACTION" in one_line(result.stderr)


def test_a_key_is_created_with_limits_of_its_own(tmp_path: Path, database: str) -> None:
    """``keys create --budget --models --rpm --tpm --expires`` keeps each limit (shown in JSON
    and in the table); a model the settings do not know, a past time or a bad amount is one
    line and status 2, and creates nothing."""
    config = tmp_path / "citadel.yaml"
    config.write_text(
        f'accounts:\n  database: "{database}"\n'
        "models:\n"
        "  - {name: sim-chat, aliases: [chat], deployments: [{name: d1, url: 'http://127.0.0.1:9'}]}\n"
        "  - {name: sim-code, deployments: [{name: d2, url: 'http://127.0.0.1:9'}]}\n",
        encoding="utf-8",
    )
    citadel = Citadel(config)
    user = citadel.json("users", "create", "--name", "A", "--email", "a@x.io")["id"]
    made = citadel.json(
        "keys",
        "create",
        "--user",
        user,
        "--budget",
        "2.5",
        "--models",
        "chat, sim-code",
        "--rpm",
        "10",
        "--tpm",
        "5000",
        "--expires",
        "2099-01-31T00:00:00Z",
    )
    assert {
        "budget_micros": 2_500_000,
        "models": ["chat", "sim-code"],
        "requests_per_minute": 10,
        "tokens_per_minute": 5000,
    } == made["key"]["limits"]
    assert made["key"]["expires_at"].startswith("2099-01-31T00:00:00")
    table = citadel.ok("keys", "list", "--user", user)
    assert "budget=$2.5 rpm=10 tpm=5000 models=chat,sim-code" in table
    for args, words in (
        (("--models", "gpt-9"), "'gpt-9' is not a configured model"),
        (("--expires", "2001-01-01T00:00:00Z"), "is not in the future"),
        (("--expires", "2099-01-01T10:00"), "UTC offset"),
        (("--budget", "-3"), "expected US dollars"),
        (("--rpm", "ten"), "expected a whole number"),
        (("--expires", "2099-01-01", "--expires-days", "3"), "not allowed with"),
    ):
        result = citadel("keys", "create", "--user", user, *args)
        assert 2 == result.returncode, (args, result.stderr)
        assert words in result.stderr, (args, result.stderr)
    assert 1 == len(citadel.json("keys", "list", "--user", user))
