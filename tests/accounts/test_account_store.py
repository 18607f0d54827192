"""The accounts store contract: the same assertions on SQLite and on a real PostgreSQL server.

Each test gets an empty, migrated database: a new SQLite file, or the module's PostgreSQL database
emptied. Every test body is a coroutine run with ``asyncio.run``, on a store opened inside it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from citadel.accounts.migrate import ACCOUNTS
from citadel.accounts.sql import SqlAccountStore, open_store, open_store_lazily
from citadel.accounts.store import ConflictError, KeyLimits, NotFoundError
from citadel.errors import ConfigError, StoreUnavailable
from citadel.stores.sql import build_engine, database_url

from support import free_port, postgres_admin, postgres_execute, scratch_postgres

T0 = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)

Body = Callable[[SqlAccountStore], Awaitable[None]]


class Clock:
    """A wall clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture(scope="module")
def postgres_database() -> Iterator[str]:
    """A fresh PostgreSQL database for this module, migrated, dropped afterwards."""
    with scratch_postgres(prepare=ACCOUNTS.upgrade) as uri:
        yield uri


def _empty(uri: str) -> None:
    asyncio.run(postgres_execute(uri, "TRUNCATE api_keys, users, teams"))


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URI of an empty, migrated accounts database of each kind."""
    if request.param == "sqlite":
        uri = f"sqlite:///{tmp_path / 'accounts.db'}"
        asyncio.run(ACCOUNTS.upgrade(uri))
        return uri
    uri = str(request.getfixturevalue("postgres_database"))
    _empty(uri)
    return uri


def run(uri: str, body: Body, clock: Clock | None = None) -> None:
    """Run ``body`` on a store over ``uri`` (with ``clock`` for its timestamps), then close it."""

    async def main() -> None:
        store = SqlAccountStore(build_engine(uri), clock=clock or Clock())
        try:
            await body(store)
        finally:
            await store.aclose()

    asyncio.run(main())


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def test_teams_are_created_listed_by_name_and_unique(database: str) -> None:
    """Teams list in name order with their creation time; a second team of one name conflicts."""

    async def body(store: SqlAccountStore) -> None:
        research = await store.create_team("research")
        platform = await store.create_team("platform")
        assert [platform, research] == await store.list_teams()
        assert T0 == research.created_at
        assert research.id.startswith("team_")
        assert 5 + 16 == len(research.id)
        with pytest.raises(ConflictError, match="'research'"):
            await store.create_team("research")

    run(database, body)


def test_a_team_budget_is_set_cleared_and_listed(database: str) -> None:
    """A team's own monthly budget (micro-USD) is kept in the store: set, listed, cleared; an
    unknown team is NotFoundError, a negative amount a ValueError, and nothing changes."""

    async def body(store: SqlAccountStore) -> None:
        team = await store.create_team("research")
        assert team.budget_micros is None
        assert 500_000_000 == (await store.set_team_budget(team.id, 500_000_000)).budget_micros
        assert [500_000_000] == [t.budget_micros for t in await store.list_teams()]
        with pytest.raises(NotFoundError, match="team_nope"):
            await store.set_team_budget("team_nope", 1)
        with pytest.raises(ValueError, match="-1"):
            await store.set_team_budget(team.id, -1)
        assert [500_000_000] == [t.budget_micros for t in await store.list_teams()]
        cleared = await store.set_team_budget(team.id, None)
        assert (team.id, "research", None) == (cleared.id, cleared.name, cleared.budget_micros)
        assert [None] == [t.budget_micros for t in await store.list_teams()]

    run(database, body)


def test_a_key_keeps_its_own_limits_and_authentication_sees_the_team(database: str) -> None:
    """A key created with a budget, model list and per-minute limits keeps them (listed and
    found by digest); the owner's team, with its budget, comes with the key; bad limits are
    ValueErrors naming the field, and create nothing."""

    async def body(store: SqlAccountStore) -> None:
        team = await store.create_team("research")
        await store.set_team_budget(team.id, 7_000_000)
        user = await store.create_user(name="A", email="a@x.io", tier="free", team_id=team.id)
        loner = await store.create_user(name="B", email="b@x.io", tier="free")
        limits = KeyLimits(
            budget_micros=2_500_000,
            models=(" sim-chat", "sim-code", "sim-chat"),
            requests_per_minute=10,
            tokens_per_minute=5_000,
        )
        key, secret = await store.create_key(user.id, name="ci", limits=limits)
        expected = KeyLimits(
            budget_micros=2_500_000,
            models=("sim-chat", "sim-code"),
            requests_per_minute=10,
            tokens_per_minute=5_000,
        )
        assert expected == key.limits
        assert [expected] == [k.limits for k in await store.list_keys(user_id=user.id)]
        found = await store.find_key(digest(secret))
        assert found is not None
        assert (expected, user.id) == (found.key.limits, found.user.id)
        assert found.team is not None
        assert (team.id, 7_000_000) == (found.team.id, found.team.budget_micros)
        plain, plain_secret = await store.create_key(loner.id, name="plain")
        assert KeyLimits() == plain.limits
        alone = await store.find_key(digest(plain_secret))
        assert alone is not None
        assert alone.team is None
        assert KeyLimits() == alone.key.limits
        for bad, field in (
            (KeyLimits(budget_micros=-1), "budget_micros"),
            (KeyLimits(requests_per_minute=-5), "requests_per_minute"),
            (KeyLimits(tokens_per_minute=10**12), "tokens_per_minute"),
            (KeyLimits(models=()), "models"),
            (KeyLimits(models=("ok", " ")), "models"),
        ):
            with pytest.raises(ValueError, match=field):
                await store.create_key(user.id, name="bad", limits=bad)
        assert 1 == len(await store.list_keys(user_id=user.id))
        assert await store.get_team(team.id) == found.team
        assert await store.get_team("team_nope") is None

    run(database, body)


def test_users_are_created_read_and_listed(database: str) -> None:
    """A new user is active with no overrides, readable by id and listed, by team if asked."""

    async def body(store: SqlAccountStore) -> None:
        team = await store.create_team("ml")
        ann = await store.create_user(name="Ann", email="ann@example.com", tier="free")
        clock.advance(1)
        bob = await store.create_user(
            name="Bob", email="bob@example.com", tier="premium", team_id=team.id
        )
        assert "active" == ann.status
        assert {} == ann.overrides
        assert ann.id.startswith("usr_")
        assert ann == await store.get_user(ann.id)
        assert bob == await store.get_user(bob.id)
        assert T0 + timedelta(seconds=1) == bob.created_at
        assert [ann, bob] == await store.list_users()
        assert [bob] == await store.list_users(team_id=team.id)
        assert await store.get_user("usr_0000000000000000") is None

    clock = Clock()
    run(database, body, clock)


def test_user_creation_refuses_a_taken_email_and_an_unknown_team(database: str) -> None:
    """An email belongs to one user; a user cannot join a team that does not exist."""

    async def body(store: SqlAccountStore) -> None:
        await store.create_user(name="Ann", email="ann@example.com", tier="free")
        with pytest.raises(ConflictError, match=re.escape("'ann@example.com'")):
            await store.create_user(name="Other", email="ann@example.com", tier="free")
        with pytest.raises(NotFoundError, match="team_missing"):
            await store.create_user(
                name="Cy", email="cy@example.com", tier="free", team_id="team_missing"
            )
        with pytest.raises(ValueError, match="email"):
            await store.create_user(name="Dee", email="not an address", tier="free")
        assert ["ann@example.com"] == [u.email for u in await store.list_users()]

    run(database, body)


def test_concurrent_creations_of_one_email_make_one_user(database: str) -> None:
    """Five simultaneous creations with one email: exactly one user, four conflicts."""

    async def body(store: SqlAccountStore) -> None:
        results = await asyncio.gather(
            *(
                store.create_user(name=f"N{i}", email="same@example.com", tier="free")
                for i in range(5)
            ),
            return_exceptions=True,
        )
        conflicts = [r for r in results if isinstance(r, ConflictError)]
        assert 4 == len(conflicts), results
        assert 1 == len(await store.list_users())

    run(database, body)


def test_update_changes_only_the_fields_given(database: str) -> None:
    """Each field changes alone; overrides replace the whole set and round-trip, None included."""

    async def body(store: SqlAccountStore) -> None:
        team = await store.create_team("ops")
        user = await store.create_user(name="Ann", email="ann@example.com", tier="free")
        await store.create_user(name="Bob", email="bob@example.com", tier="free")
        updated = await store.update_user(user.id, tier="premium", team_id=team.id, name="Ann B.")
        assert dataclasses.replace(user, tier="premium", team_id=team.id, name="Ann B.") == updated
        overrides = {"requests_per_minute": 100.0, "tokens_per_day": None}
        updated = await store.update_user(user.id, overrides=overrides)
        assert overrides == updated.overrides
        assert overrides == (await store.get_user(user.id) or user).overrides
        updated = await store.update_user(user.id, overrides={"cost_per_month_usd": 2.5})
        assert {"cost_per_month_usd": 2.5} == updated.overrides
        updated = await store.update_user(user.id, status="disabled", email="ann@example.org")
        assert ("disabled", "ann@example.org") == (updated.status, updated.email)
        assert updated == await store.update_user(user.id)  # nothing to change
        assert updated == await store.get_user(user.id)

    run(database, body)


def test_update_refuses_unknown_ids_taken_emails_and_bad_values(database: str) -> None:
    """Unknown user or team: NotFoundError naming it; a taken email: ConflictError; bad values."""

    async def body(store: SqlAccountStore) -> None:
        ann = await store.create_user(name="Ann", email="ann@example.com", tier="free")
        await store.create_user(name="Bob", email="bob@example.com", tier="free")
        with pytest.raises(NotFoundError, match="usr_missing"):
            await store.update_user("usr_missing", tier="free")
        with pytest.raises(NotFoundError, match="usr_missing"):
            await store.update_user("usr_missing")
        with pytest.raises(NotFoundError, match="team_missing"):
            await store.update_user(ann.id, team_id="team_missing")
        with pytest.raises(ConflictError, match=re.escape("'bob@example.com'")):
            await store.update_user(ann.id, email="bob@example.com")
        with pytest.raises(ValueError, match="'wings'"):
            await store.update_user(ann.id, overrides={"wings": 2.0})
        with pytest.raises(ValueError, match="requests_per_minute"):
            await store.update_user(ann.id, overrides={"requests_per_minute": -1.0})
        assert ann == await store.get_user(ann.id)

    run(database, body)


def test_a_key_is_found_by_the_digest_of_its_secret(database: str) -> None:
    """create_key returns a secret shown once; its SHA-256 finds the key and its owner."""

    async def body(store: SqlAccountStore) -> None:
        user = await store.create_user(name="Ann", email="ann@example.com", tier="standard")
        key, secret = await store.create_key(user.id, name="ci")
        assert secret.startswith("sk-cit-")
        assert 40 < len(secret)
        assert secret[:12] == key.prefix
        assert key.id.startswith("key_")
        assert (T0, None, None, None) == (
            key.created_at,
            key.last_used_at,
            key.expires_at,
            key.revoked_at,
        )
        record = await store.find_key(digest(secret))
        assert record is not None
        assert (key, user) == (record.key, record.user)
        assert await store.find_key(digest(secret + "x")) is None
        clock.advance(1)
        other, other_secret = await store.create_key(user.id, name="laptop")
        assert other_secret != secret
        assert [key, other] == await store.list_keys()
        assert [key, other] == await store.list_keys(user_id=user.id)
        assert [] == await store.list_keys(user_id="usr_someone_else")
        listed = repr(await store.list_keys())
        assert secret not in listed
        assert other_secret not in listed

    clock = Clock()
    run(database, body, clock)


def test_keys_of_unknown_users_and_unknown_keys_are_not_found(database: str) -> None:
    """create_key for an unknown user and revoke_key of an unknown key name the missing id."""

    async def body(store: SqlAccountStore) -> None:
        with pytest.raises(NotFoundError, match="usr_missing"):
            await store.create_key("usr_missing", name="x")
        with pytest.raises(NotFoundError, match="key_missing"):
            await store.revoke_key("key_missing")
        assert [] == await store.list_keys()

    run(database, body)


def test_a_revoked_key_is_still_found_with_its_revocation_time(database: str) -> None:
    """Revoking stamps revoked_at once; find_key still returns the key (the gateway decides)."""

    async def body(store: SqlAccountStore) -> None:
        user = await store.create_user(name="Ann", email="ann@example.com", tier="free")
        key, secret = await store.create_key(user.id, name="ci")
        clock.advance(60)
        revoked = await store.revoke_key(key.id)
        assert dataclasses.replace(key, revoked_at=T0 + timedelta(seconds=60)) == revoked
        clock.advance(60)
        assert revoked == await store.revoke_key(key.id)  # the first revocation time stays
        record = await store.find_key(digest(secret))
        assert record is not None
        assert revoked == record.key

    clock = Clock()
    run(database, body, clock)


def test_expiry_round_trips_as_an_aware_utc_time(database: str) -> None:
    """An expiry given in any timezone comes back as the same instant, in UTC."""

    async def body(store: SqlAccountStore) -> None:
        user = await store.create_user(name="Ann", email="ann@example.com", tier="free")
        expires = datetime(2031, 1, 2, 3, 4, 5, 678901, tzinfo=timezone(timedelta(hours=5)))
        key, secret = await store.create_key(user.id, name="ci", expires_at=expires)
        record = await store.find_key(digest(secret))
        assert record is not None
        for found in (
            key.expires_at,
            record.key.expires_at,
            (await store.list_keys())[0].expires_at,
        ):
            assert expires == found
            assert found is not None
            assert UTC == found.tzinfo
        assert UTC == record.user.created_at.tzinfo
        with pytest.raises(ValueError, match="timezone"):
            await store.create_key(user.id, name="naive", expires_at=datetime(2031, 1, 1))

    run(database, body)


def test_touch_keys_records_the_latest_use(database: str) -> None:
    """touch_keys sets last_used_at, never moves it back, and ignores unknown keys."""

    async def body(store: SqlAccountStore) -> None:
        user = await store.create_user(name="Ann", email="ann@example.com", tier="free")
        first, _ = await store.create_key(user.id, name="a")
        clock.advance(1)
        second, _ = await store.create_key(user.id, name="b")
        later, earlier = T0 + timedelta(minutes=5), T0 + timedelta(minutes=1)
        await store.touch_keys({first.id: later, second.id: earlier, "key_missing": later})
        await store.touch_keys({first.id: earlier})  # an older report, flushed late
        await store.touch_keys({})
        used = {k.id: k.last_used_at for k in await store.list_keys()}
        assert {first.id: later, second.id: earlier} == used

    clock = Clock()
    run(database, body, clock)


def test_ping_answers_when_the_database_does(database: str) -> None:
    """ping returns quietly on a reachable database."""

    async def body(store: SqlAccountStore) -> None:
        await store.ping()

    run(database, body)


def test_reads_survive_a_dropped_connection(postgres_database: str) -> None:
    """When the server drops pooled connections (a restart), the next read reconnects."""

    async def body(store: SqlAccountStore) -> None:
        user = await store.create_user(name="Ann", email="ann@example.com", tier="free")
        _, secret = await store.create_key(user.id, name="ci")
        assert await store.find_key(digest(secret)) is not None
        name = postgres_database.rsplit("/", 1)[1]
        await postgres_admin(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE datname = '{name}' AND pid <> pg_backend_pid()"
        )
        record = await store.find_key(digest(secret))
        assert record is not None
        assert user == record.user

    _empty(postgres_database)
    run(postgres_database, body)


@pytest.mark.parametrize(
    ("uri", "url"),
    [
        ("postgresql://u:p%40ss@db:5432/citadel", "postgresql+asyncpg://u:p%40ss@db:5432/citadel"),
        ("postgres://db/citadel?sslmode=require", "postgresql+asyncpg://db/citadel?ssl=require"),
        ("postgresql://db:5432", "postgresql+asyncpg://db:5432"),
        ("postgresql+asyncpg://db/x", "postgresql+asyncpg://db/x"),
        ("sqlite:///citadel.db", "sqlite+aiosqlite:///citadel.db"),
        ("sqlite:////var/lib/citadel/a.db", "sqlite+aiosqlite:////var/lib/citadel/a.db"),
        ("sqlite+aiosqlite:///citadel.db", "sqlite+aiosqlite:///citadel.db"),
    ],
)
def test_database_urls_name_the_async_drivers(uri: str, url: str) -> None:
    """PostgreSQL URIs use asyncpg and SQLite ones aiosqlite; a driver named already is kept."""
    assert url == database_url(uri)


@pytest.mark.parametrize("uri", ["mysql://db/x", "postgresql+psycopg2://db/x", "citadel.db"])
def test_other_databases_are_a_setting_error(uri: str) -> None:
    """A URI of another database or driver is a ConfigError naming accounts.database."""
    with pytest.raises(ConfigError, match=r"accounts\.database"):
        database_url(uri)


def test_open_store_migrates_when_asked(tmp_path: Path) -> None:
    """open_store(migrate=True) on a new SQLite file leaves a store ready to use."""

    async def main() -> None:
        store = await open_store(f"sqlite:///{tmp_path / 'new.db'}", migrate=True)
        try:
            team = await store.create_team("t")
            assert [team] == await store.list_teams()
        finally:
            await store.aclose()

    asyncio.run(main())


def test_missing_tables_are_reported_as_unavailable_with_the_remedy(tmp_path: Path) -> None:
    """A database never migrated answers StoreUnavailable that says to run `citadel migrate`."""

    async def main() -> None:
        store = open_store_lazily(f"sqlite:///{tmp_path / 'bare.db'}")
        try:
            with pytest.raises(StoreUnavailable, match="citadel migrate") as caught:
                await store.find_key(b"\0" * 32)
            assert "sql" == caught.value.store
        finally:
            await store.aclose()

    asyncio.run(main())


def test_an_unreachable_postgresql_is_unavailable_quickly() -> None:
    """Nothing listening on the port: StoreUnavailable("sql") from open, ping and find_key, fast."""
    uri = f"postgresql://postgres@127.0.0.1:{free_port()}/citadel"

    async def main() -> None:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable) as caught:
            await open_store(uri, migrate=False)
        assert "sql" == caught.value.store
        store = open_store_lazily(uri)
        try:
            with pytest.raises(StoreUnavailable):
                await store.ping()
            with pytest.raises(StoreUnavailable):
                await store.find_key(b"\0" * 32)
        finally:
            await store.aclose()
        assert time.monotonic() - started < 2.0

    asyncio.run(main())


def test_deleting_a_user_revokes_their_keys_and_keeps_the_record(database: str) -> None:
    """Issue 18 item 5: deleting a user disables them, revokes every key of theirs (a key
    revoked before keeps its time) and hides them from listings; the record stays (by id, for
    the ledger's history), their email stays taken, and a deleted user cannot be changed or
    given a key. Deleting again keeps the first time; an unknown id is NotFoundError."""
    clock = Clock()

    async def body(store: SqlAccountStore) -> None:
        team = await store.create_team("research")
        alice = await store.create_user(
            name="Alice", email="alice@example.com", tier="pro", team_id=team.id
        )
        bob = await store.create_user(name="Bob", email="bob@example.com", tier="pro")
        old, _ = await store.create_key(alice.id, name="old")
        await store.revoke_key(old.id)
        _, secret = await store.create_key(alice.id, name="live")
        bobs, _ = await store.create_key(bob.id, name="bob's")
        clock.advance(60)
        deleted = await store.delete_user(alice.id)
        assert (T0 + timedelta(seconds=60), "disabled") == (deleted.deleted_at, deleted.status)
        keys = {k.name: k.revoked_at for k in await store.list_keys(user_id=alice.id)}
        assert {"old": T0, "live": T0 + timedelta(seconds=60)} == keys
        assert (await store.list_keys(user_id=bob.id))[0].revoked_at is None
        record = await store.find_key(digest(secret))
        assert record is not None
        assert record.key.revoked_at is not None
        assert ("disabled", deleted.deleted_at) == (record.user.status, record.user.deleted_at)
        assert [bob.id] == [u.id for u in await store.list_users()]
        assert [] == await store.list_users(team_id=team.id)
        assert deleted == await store.get_user(alice.id)
        assert {alice.id, bob.id} == {u.id for u in await store.list_users(include_deleted=True)}
        with pytest.raises(ConflictError, match="deleted"):
            await store.update_user(alice.id, name="Alicia")
        with pytest.raises(ConflictError, match="deleted"):
            await store.create_key(alice.id, name="again")
        with pytest.raises(ConflictError, match=r"alice@example\.com"):
            await store.create_user(name="A", email="alice@example.com", tier="pro")
        clock.advance(60)
        assert deleted == await store.delete_user(alice.id)
        with pytest.raises(NotFoundError):
            await store.delete_user("usr_nope")
        assert bobs.id in {k.id for k in await store.list_keys()}

    run(database, body, clock)


def test_a_team_is_renamed_and_deleted_once_it_has_no_members(database: str) -> None:
    """Issue 18 item 5: a team is renamed (its id and budget kept); a name taken by another
    team, a deleted one included, is a ConflictError (409); a team with members cannot be
    deleted (409 naming the count); once they are gone it is deleted: hidden from listings,
    kept by id, its name taken, and it can no longer be renamed, budgeted or joined."""

    async def body(store: SqlAccountStore) -> None:
        research = await store.create_team("research")
        platform = await store.create_team("platform")
        await store.set_team_budget(research.id, 5_000_000)
        renamed = await store.rename_team(research.id, "  science ")
        assert ("science", research.id, 5_000_000) == (
            renamed.name,
            renamed.id,
            renamed.budget_micros,
        )
        assert ["platform", "science"] == [t.name for t in await store.list_teams()]
        with pytest.raises(ConflictError, match="'platform'"):
            await store.rename_team(research.id, "platform")
        with pytest.raises(NotFoundError):
            await store.rename_team("team_nope", "x")
        with pytest.raises(ValueError, match="name"):
            await store.rename_team(research.id, " ")
        member = await store.create_user(
            name="Carol", email="carol@example.com", tier="pro", team_id=platform.id
        )
        with pytest.raises(ConflictError, match="1 member"):
            await store.delete_team(platform.id)
        await store.delete_user(member.id)
        gone = await store.delete_team(platform.id)
        assert gone.deleted_at == T0
        assert ["science"] == [t.name for t in await store.list_teams()]
        assert [gone, renamed] == await store.list_teams(include_deleted=True)
        assert gone == await store.get_team(platform.id)
        with pytest.raises(ConflictError, match="'platform'"):
            await store.rename_team(research.id, "platform")
        for attempt in (
            store.rename_team(platform.id, "newer"),
            store.set_team_budget(platform.id, 1),
            store.create_user(name="D", email="d@example.com", tier="pro", team_id=platform.id),
        ):
            with pytest.raises(ConflictError, match="deleted"):
                await attempt
        with pytest.raises(NotFoundError):
            await store.delete_team("team_nope")

    run(database, body)
