"""The accounts store in SQL: PostgreSQL (asyncpg) in production, SQLite (aiosqlite) embedded.

    store = await open_store("postgresql://db:5432/citadel", migrate=False)
    key, secret = await store.create_key(user.id, name="ci")
    record = await store.find_key(hashlib.sha256(secret.encode()).digest())

This module is the boundary between Citadel and the database driver: every driver or connection
error is translated here, once, into ``StoreUnavailable("sql", ...)``; a unique value taken into
``ConflictError``; an unknown id into ``NotFoundError``. Each operation has a deadline
(``operation_timeout``) after which the database counts as unavailable.

Reads (``find_key``, ``get_user``, listings, ``ping``) run outside a transaction on PostgreSQL,
saving a BEGIN and a ROLLBACK per call, and are retried once when the pooled connection they were
given turns out to be dead (a restarted server), so only a database that is really down is
reported as one. Writes are not retried: whether a lost commit happened is unknown.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import (
    Executable,
    bindparam,
    exc,
    func,
    insert,
    literal,
    select,
    text,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from citadel.accounts import keyformat
from citadel.accounts.schema import (
    KEY_PREFIX,
    TEAM_PREFIX,
    USER_PREFIX,
    ApiKeyRow,
    TeamRow,
    UserRow,
    UtcDateTime,
    new_id,
)
from citadel.accounts.store import (
    OVERRIDABLE,
    ApiKey,
    ConflictError,
    KeyLimits,
    KeyRecord,
    NotFoundError,
    Team,
    User,
    UserStatus,
)
from citadel.limits.maths import MAX_RATE
from citadel.stores.sql import DEFAULT_TIMEOUT, build_engine, translate_errors

__all__ = [
    "SECRET_PREFIX",
    "SqlAccountStore",
    "open_store",
    "open_store_lazily",
]

SECRET_PREFIX = keyformat.PREFIX
VISIBLE_PREFIX_CHARS = 12
STATUSES = ("active", "disabled")

_USER = (
    UserRow.id,
    UserRow.name,
    UserRow.email,
    UserRow.team_id,
    UserRow.tier,
    UserRow.status,
    UserRow.created_at,
    UserRow.overrides,
    UserRow.deleted_at,
)
_KEY = (
    ApiKeyRow.id,
    ApiKeyRow.user_id,
    ApiKeyRow.name,
    ApiKeyRow.prefix,
    ApiKeyRow.created_at,
    ApiKeyRow.last_used_at,
    ApiKeyRow.expires_at,
    ApiKeyRow.revoked_at,
    ApiKeyRow.budget_micros,
    ApiKeyRow.models,
    ApiKeyRow.requests_per_minute,
    ApiKeyRow.tokens_per_minute,
)
_TEAM = (TeamRow.id, TeamRow.name, TeamRow.created_at, TeamRow.budget_micros, TeamRow.deleted_at)
_PING = text("SELECT 1")
# Authentication's query, built once: the key with this digest, its owner and the owner's team,
# in one round trip.
_FIND_KEY = (
    select(*_KEY, *_USER, *_TEAM)
    .join_from(ApiKeyRow, UserRow, ApiKeyRow.user_id == UserRow.id)
    .outerjoin(TeamRow, UserRow.team_id == TeamRow.id)
    .where(ApiKeyRow.digest == bindparam("digest"))
)
_KEY_COLUMNS, _USER_COLUMNS = len(_KEY), len(_USER)
_TOUCH_KEY = (
    update(ApiKeyRow)
    .where(ApiKeyRow.id == bindparam("key_id"))
    .where((ApiKeyRow.last_used_at.is_(None)) | (ApiKeyRow.last_used_at < bindparam("used_at")))
    .values(last_used_at=bindparam("used_at"))
)


# -- the store --------------------------------------------------------------------------------


class SqlAccountStore:
    """``AccountStore`` over a SQLAlchemy async engine (which the store owns and closes)."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        operation_timeout: float = DEFAULT_TIMEOUT,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._engine = engine
        postgres = engine.dialect.name == "postgresql"
        self._reader = (
            engine.execution_options(isolation_level="AUTOCOMMIT") if postgres else engine
        )
        self._timeout = operation_timeout
        self._clock = clock

    @property
    def engine(self) -> AsyncEngine:
        return self._engine

    # - teams

    async def create_team(self, name: str) -> Team:
        name = _required("name", name)
        team = Team(id=new_id(TEAM_PREFIX), name=name, created_at=self._clock())
        async with self._write() as conn:
            try:
                await conn.execute(
                    insert(TeamRow).values(id=team.id, name=name, created_at=team.created_at)
                )
            except exc.IntegrityError as error:
                raise ConflictError(f"a team named {name!r} exists already") from error
        return team

    async def list_teams(self, *, include_deleted: bool = False) -> list[Team]:
        """The teams not deleted (all of them with ``include_deleted``: to name history)."""
        statement = select(*_TEAM).order_by(TeamRow.name)
        if not include_deleted:
            statement = statement.where(TeamRow.deleted_at.is_(None))
        return [_team(r) for r in await self._read(statement)]

    async def get_team(self, team_id: str) -> Team | None:
        rows = await self._read(select(*_TEAM).where(TeamRow.id == team_id))
        return _team(rows[0]) if rows else None

    async def set_team_budget(self, team_id: str, budget_micros: int | None) -> Team:
        if budget_micros is not None and (
            isinstance(budget_micros, bool) or not 0 <= budget_micros < 2**63
        ):
            raise ValueError(f"budget {budget_micros!r}: expected micro-USD >= 0, or none")
        async with self._write() as conn:
            await _require_team(conn, team_id)
            row = (
                await conn.execute(
                    update(TeamRow)
                    .where(TeamRow.id == team_id)
                    .values(budget_micros=budget_micros)
                    .returning(*_TEAM)
                )
            ).first()
        if row is None:
            raise NotFoundError(f"no team has id {team_id!r}")
        return _team(row)

    async def rename_team(self, team_id: str, name: str) -> Team:
        """Rename a team: NotFoundError for an unknown id, ConflictError for a name taken
        (by any team, a deleted one included) or a deleted team."""
        name = _required("name", name)
        async with self._write() as conn:
            await _require_team(conn, team_id)
            try:
                row = (
                    await conn.execute(
                        update(TeamRow)
                        .where(TeamRow.id == team_id)
                        .values(name=name)
                        .returning(*_TEAM)
                    )
                ).first()
            except exc.IntegrityError as error:
                raise ConflictError(f"a team named {name!r} exists already") from error
        assert row is not None  # required above, in the same transaction
        return _team(row)

    async def delete_team(self, team_id: str) -> Team:
        """Mark a team deleted: hidden from listings, its name still taken, its ledger rows
        kept. ConflictError while it has members not deleted (move or delete them first);
        deleting it again keeps the first time."""
        now = self._clock()
        async with self._write() as conn:
            members = (
                await conn.execute(
                    select(func.count())
                    .select_from(UserRow)
                    .where(UserRow.team_id == team_id, UserRow.deleted_at.is_(None))
                )
            ).scalar_one()
            if members:
                raise ConflictError(
                    f"the team {team_id!r} has {members} member(s): move them to another team "
                    "or delete them first"
                )
            row = (
                await conn.execute(
                    update(TeamRow)
                    .where(TeamRow.id == team_id)
                    .values(
                        deleted_at=func.coalesce(TeamRow.deleted_at, literal(now, UtcDateTime()))
                    )
                    .returning(*_TEAM)
                )
            ).first()
        if row is None:
            raise NotFoundError(f"no team has id {team_id!r}")
        return _team(row)

    # - users

    async def create_user(
        self, *, name: str, email: str, tier: str, team_id: str | None = None
    ) -> User:
        user = User(
            id=new_id(USER_PREFIX),
            name=_required("name", name),
            email=_email(email),
            team_id=team_id,
            tier=_required("tier", tier),
            status="active",
            created_at=self._clock(),
        )
        async with self._write() as conn:
            if team_id is not None:
                await _require_team(conn, team_id)
            try:
                await conn.execute(
                    insert(UserRow).values(
                        id=user.id,
                        name=user.name,
                        email=user.email,
                        team_id=team_id,
                        tier=user.tier,
                        status=user.status,
                        created_at=user.created_at,
                        overrides={},
                    )
                )
            except exc.IntegrityError as error:
                raise _email_taken(user.email) from error
        return user

    async def delete_user(self, user_id: str) -> User:
        """Mark a user deleted and disabled and revoke every key of theirs, in one
        transaction: hidden from listings, their email still taken, their ledger rows and keys
        kept (revoked). Deleting them again keeps the first times."""
        now = literal(self._clock(), UtcDateTime())
        async with self._write() as conn:
            row = (
                await conn.execute(
                    update(UserRow)
                    .where(UserRow.id == user_id)
                    .values(deleted_at=func.coalesce(UserRow.deleted_at, now), status="disabled")
                    .returning(*_USER)
                )
            ).first()
            if row is None:
                raise NotFoundError(f"no user has id {user_id!r}")
            await conn.execute(
                update(ApiKeyRow)
                .where(ApiKeyRow.user_id == user_id, ApiKeyRow.revoked_at.is_(None))
                .values(revoked_at=now)
            )
        return _user(row)

    async def get_user(self, user_id: str) -> User | None:
        rows = await self._read(select(*_USER).where(UserRow.id == user_id))
        return _user(rows[0]) if rows else None

    async def list_users(
        self, *, team_id: str | None = None, include_deleted: bool = False
    ) -> list[User]:
        """The users not deleted (all of them with ``include_deleted``: to name history), of
        a team if given."""
        statement = select(*_USER).order_by(UserRow.created_at, UserRow.id)
        if not include_deleted:
            statement = statement.where(UserRow.deleted_at.is_(None))
        if team_id is not None:
            statement = statement.where(UserRow.team_id == team_id)
        return [_user(row) for row in await self._read(statement)]

    async def update_user(
        self,
        user_id: str,
        *,
        name: str | None = None,
        email: str | None = None,
        tier: str | None = None,
        team_id: str | None = None,
        status: UserStatus | None = None,
        overrides: dict[str, float | None] | None = None,
    ) -> User:
        """Change the fields given; ``overrides`` replaces the user's whole set of overrides."""
        values: dict[str, object] = {}
        if name is not None:
            values["name"] = _required("name", name)
        if email is not None:
            values["email"] = _email(email)
        if tier is not None:
            values["tier"] = _required("tier", tier)
        if team_id is not None:
            values["team_id"] = team_id
        if status is not None:
            if status not in STATUSES:
                raise ValueError(f"status {status!r}: expected one of {', '.join(STATUSES)}")
            values["status"] = status
        if overrides is not None:
            values["overrides"] = checked_overrides(overrides)
        async with self._write() as conn:
            if team_id is not None:
                await _require_team(conn, team_id)
            if values:
                await _require_live_user(conn, user_id)
            statement: Executable
            if values:
                statement = (
                    update(UserRow).where(UserRow.id == user_id).values(values).returning(*_USER)
                )
            else:
                statement = select(*_USER).where(UserRow.id == user_id)
            try:
                row = (await conn.execute(statement)).first()
            except exc.IntegrityError as error:
                raise _email_taken(str(values.get("email"))) from error
        if row is None:
            raise NotFoundError(f"no user has id {user_id!r}")
        return _user(row)

    # - keys

    async def create_key(
        self,
        user_id: str,
        *,
        name: str,
        expires_at: datetime | None = None,
        limits: KeyLimits | None = None,
    ) -> tuple[ApiKey, str]:
        """A new key (with ``limits`` of its own) and its secret; the secret is not kept and
        cannot be shown again. ValueError for a limit out of range."""
        if expires_at is not None and expires_at.tzinfo is None:
            raise ValueError(f"expires_at {expires_at.isoformat()}: expected a timezone-aware time")
        limits = checked_key_limits(limits or KeyLimits())
        secret = keyformat.new_secret()
        key = ApiKey(
            id=new_id(KEY_PREFIX),
            user_id=user_id,
            name=_required("name", name),
            prefix=secret[:VISIBLE_PREFIX_CHARS],
            created_at=self._clock(),
            last_used_at=None,
            expires_at=None if expires_at is None else expires_at.astimezone(UTC),
            revoked_at=None,
            limits=limits,
        )
        async with self._write() as conn:
            await _require_live_user(conn, user_id)
            await conn.execute(
                insert(ApiKeyRow).values(
                    id=key.id,
                    user_id=user_id,
                    name=key.name,
                    digest=hashlib.sha256(secret.encode()).digest(),
                    prefix=key.prefix,
                    created_at=key.created_at,
                    expires_at=key.expires_at,
                    budget_micros=limits.budget_micros,
                    models=None if limits.models is None else list(limits.models),
                    requests_per_minute=limits.requests_per_minute,
                    tokens_per_minute=limits.tokens_per_minute,
                )
            )
        return key, secret

    async def list_keys(self, *, user_id: str | None = None) -> list[ApiKey]:
        statement = select(*_KEY).order_by(ApiKeyRow.created_at, ApiKeyRow.id)
        if user_id is not None:
            statement = statement.where(ApiKeyRow.user_id == user_id)
        return [_key(row) for row in await self._read(statement)]

    async def revoke_key(self, key_id: str) -> ApiKey:
        """Revoke a key; revoking it again keeps the first revocation time."""
        now = self._clock()
        statement = (
            update(ApiKeyRow)
            .where(ApiKeyRow.id == key_id)
            .values(revoked_at=func.coalesce(ApiKeyRow.revoked_at, literal(now, UtcDateTime())))
            .returning(*_KEY)
        )
        async with self._write() as conn:
            row = (await conn.execute(statement)).first()
        if row is None:
            raise NotFoundError(f"no key has id {key_id!r}")
        return _key(row)

    async def find_key(self, digest: bytes) -> KeyRecord | None:
        """The key whose secret has this SHA-256 digest, with its owner; revoked ones included."""
        rows = await self._read(_FIND_KEY, {"digest": digest})
        if not rows:
            return None
        row = rows[0]
        team = row[_KEY_COLUMNS + _USER_COLUMNS :]
        return KeyRecord(
            key=_key(row[:_KEY_COLUMNS]),
            user=_user(row[_KEY_COLUMNS : _KEY_COLUMNS + _USER_COLUMNS]),
            team=None if team[0] is None else _team(team),
        )

    async def touch_keys(self, last_used: dict[str, datetime]) -> None:
        """Record when keys were last used; a time older than the one stored, or an unknown
        key id, changes nothing (several gateways flush in any order)."""
        if not last_used:
            return
        params = []
        for key_id, used_at in sorted(last_used.items()):  # sorted: one lock order, no deadlock
            if used_at.tzinfo is None:
                raise ValueError(f"last used time of {key_id}: expected a timezone-aware time")
            params.append({"key_id": key_id, "used_at": used_at})
        async with self._write() as conn:
            await conn.execute(_TOUCH_KEY, params)

    async def ping(self) -> None:
        """Raise StoreUnavailable unless the database answers ``SELECT 1``."""
        await self._read(_PING)

    async def aclose(self) -> None:
        await self._engine.dispose()

    # - plumbing

    @contextlib.asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncConnection]:
        """A transaction, committed when the block ends without an error."""
        with translate_errors(self._timeout):
            async with asyncio.timeout(self._timeout), self._engine.begin() as conn:
                yield conn

    async def _read(
        self, statement: Executable, params: Mapping[str, object] | None = None
    ) -> Sequence[Sequence[Any]]:
        """The rows of ``statement``; asked again on a fresh connection if the pooled one died."""
        with translate_errors(self._timeout):
            async with asyncio.timeout(self._timeout):
                try:
                    return await self._fetch(statement, params)
                except exc.DBAPIError as error:
                    if not error.connection_invalidated:
                        raise
                return await self._fetch(statement, params)

    async def _fetch(
        self, statement: Executable, params: Mapping[str, object] | None
    ) -> Sequence[Sequence[Any]]:
        async with self._reader.connect() as conn:
            return (await conn.execute(statement, params)).all()


async def open_store(
    uri: str, *, migrate: bool, operation_timeout: float = DEFAULT_TIMEOUT
) -> SqlAccountStore:
    """A store on ``uri``, its database reached (StoreUnavailable if not) and, if ``migrate``,
    upgraded to the newest schema."""
    from citadel.accounts.migrate import ACCOUNTS

    store = SqlAccountStore(
        build_engine(uri, operation_timeout=operation_timeout), operation_timeout=operation_timeout
    )
    try:
        if migrate:
            with translate_errors():
                await ACCOUNTS.upgrade_engine(store.engine)
        else:
            await store.ping()
    except BaseException:
        await store.aclose()
        raise
    return store


def open_store_lazily(uri: str, *, operation_timeout: float = DEFAULT_TIMEOUT) -> SqlAccountStore:
    """A store on ``uri`` that connects on first use (for processes that start before the
    database); the tables must exist already (``citadel migrate``)."""
    return SqlAccountStore(
        build_engine(uri, operation_timeout=operation_timeout), operation_timeout=operation_timeout
    )


# -- rows and values --------------------------------------------------------------------------


def _user(row: Sequence[Any]) -> User:
    overrides = cast(Mapping[str, float | None] | None, row[7]) or {}
    return User(
        id=row[0],
        name=row[1],
        email=row[2],
        team_id=row[3],
        tier=row[4],
        status=row[5],
        created_at=row[6],
        overrides={k: None if v is None else float(v) for k, v in overrides.items()},
        deleted_at=row[8],
    )


def _team(row: Sequence[Any]) -> Team:
    return Team(id=row[0], name=row[1], created_at=row[2], budget_micros=row[3], deleted_at=row[4])


def checked_key_limits(limits: KeyLimits) -> KeyLimits:
    """``limits`` if every value is in range (amounts >= 0, a non-empty list of model names),
    with the model names stripped; ValueError naming the first that is not."""
    for field, value, top in (
        ("budget_micros", limits.budget_micros, 2**63),
        ("requests_per_minute", limits.requests_per_minute, MAX_RATE + 1),
        ("tokens_per_minute", limits.tokens_per_minute, MAX_RATE + 1),
    ):
        if value is not None and (isinstance(value, bool) or not 0 <= value < top):
            raise ValueError(f"key limit {field}={value!r}: expected a whole number 0..{top - 1}")
    models = limits.models
    if models is not None:
        names = tuple(dict.fromkeys(str(m).strip() for m in models))
        if not names or not all(names):
            raise ValueError(f"key models {list(models)!r}: expected one or more model names")
        limits = dataclasses.replace(limits, models=names)
    return limits


def _key(row: Sequence[Any]) -> ApiKey:
    models = cast(Sequence[str] | None, row[9])
    return ApiKey(
        id=row[0],
        user_id=row[1],
        name=row[2],
        prefix=row[3],
        created_at=row[4],
        last_used_at=row[5],
        expires_at=row[6],
        revoked_at=row[7],
        limits=KeyLimits(
            budget_micros=row[8],
            models=None if models is None else tuple(models),
            requests_per_minute=row[10],
            tokens_per_minute=row[11],
        ),
    )


async def _require_team(conn: AsyncConnection, team_id: str) -> None:
    found = (await conn.execute(select(TeamRow.deleted_at).where(TeamRow.id == team_id))).first()
    if found is None:
        raise NotFoundError(f"no team has id {team_id!r}")
    if found[0] is not None:
        raise _deleted("team", team_id)


async def _require_live_user(conn: AsyncConnection, user_id: str) -> None:
    found = (await conn.execute(select(UserRow.deleted_at).where(UserRow.id == user_id))).first()
    if found is None:
        raise NotFoundError(f"no user has id {user_id!r}")
    if found[0] is not None:
        raise _deleted("user", user_id)


def _deleted(what: str, id_: str) -> ConflictError:
    return ConflictError(f"the {what} {id_!r} was deleted and cannot be changed or used")


def _required(field: str, value: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{field} {value!r}: expected a non-empty string")
    return value.strip()


def _email(value: str) -> str:
    email = _required("email", value)
    local, at, domain = email.rpartition("@")
    if not (at and local and domain) or any(c.isspace() for c in email):
        raise ValueError(f"email {value!r}: expected an address such as name@example.com")
    return email


def _email_taken(email: str) -> ConflictError:
    return ConflictError(f"a user with email {email!r} exists already")


def checked_overrides(overrides: Mapping[str, float | None]) -> dict[str, float | None]:
    """Overrides as stored: known limit names, each a finite number >= 0 or None (unlimited)."""
    checked: dict[str, float | None] = {}
    for name, value in overrides.items():
        if name not in OVERRIDABLE:
            raise ValueError(f"override {name!r}: expected one of {', '.join(OVERRIDABLE)}")
        if value is None:
            checked[name] = None
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
            raise ValueError(f"override {name}={value!r}: expected a number >= 0, or None")
        if value == float("inf"):
            raise ValueError(f"override {name}={value!r}: expected a finite number, or None")
        checked[name] = float(value)
    return checked
