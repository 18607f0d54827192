"""The accounts commands: ``citadel migrate``, ``teams``, ``users`` and ``keys``.

    citadel migrate
    citadel teams create NAME | list | budget TEAM (--usd AMOUNT | --none)
    citadel users create --name NAME --email EMAIL [--tier TIER] [--team TEAM]
    citadel users list [--team TEAM]
    citadel users update ID [--name] [--email] [--tier] [--team] [--status active|disabled]
                            [--override KEY=VALUE ...]
    citadel users disable ID
    citadel keys create --user ID [--name NAME] [--expires-days N | --expires TIME]
                        [--budget USD] [--models M1,M2] [--rpm N] [--tpm N]
    citadel keys list [--user ID]
    citadel keys revoke KEY_ID

Each prints a table, or JSON with ``--json``. The database is ``settings.accounts.database``. A
PostgreSQL database is upgraded only by ``citadel migrate`` (an operator's decision, taken once per
release); the embedded SQLite one is upgraded by whichever of these commands opens it first.

Exit status: 0 done; 2 a request that cannot be done (an unknown id, a value taken, a bad tier,
override or email), told in one line; 1 the database could not be reached. SQLAlchemy and Alembic
are imported when one of these commands runs, not whenever the ``citadel`` parser is built.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from citadel.accounts.store import (
    OVERRIDABLE,
    AccountStore,
    ApiKey,
    KeyLimits,
    NotFoundError,
    Team,
    User,
)
from citadel.errors import StoreUnavailable
from citadel.settings import Settings

Handler = Callable[[argparse.Namespace, Settings], int]
Action = Callable[[AccountStore, argparse.Namespace, Settings], Awaitable[object]]

# Override values that are not numbers: no limit at all, or back to the tier's own limit.
UNLIMITED, DEFAULT = "unlimited", "default"
_FRACTIONAL = ("cost_per_month_usd",)  # every other limit counts whole things


def add_arguments(commands: argparse._SubParsersAction[Any]) -> None:
    """Register ``migrate``, ``teams``, ``users`` and ``keys`` on the ``citadel`` command."""
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument("--json", action="store_true", help="print JSON instead of a table")

    migrate = commands.add_parser(
        "migrate",
        parents=[output],
        help="create or upgrade the accounts tables",
        description="Upgrade the accounts database (accounts.database, SQL_DATABASE_ENDPOINT) "
        "and the usage ledger (metering.database, else the same) to the newest schema. Safe to "
        "run again, and from several machines at once.",
    )
    migrate.add_argument(
        "--rebuild-rollups",
        action="store_true",
        help="then recompute every usage rollup from the ledger's events, in one transaction "
        "(after a bulk load of events, or to repair them); stop the ledger writers first",
    )
    migrate.set_defaults(func=_cmd_migrate)

    teams = _group(commands, "teams", "create, list, rename and delete teams")
    create = _leaf(teams, "create", "create a team", output, _create_team)
    create.add_argument("name", metavar="NAME")
    _leaf(teams, "list", "list teams", output, _list_teams)
    rename = _leaf(teams, "rename", "rename a team (a taken name is refused)", output, _rename)
    rename.add_argument("team", metavar="TEAM", help="a team's id or name")
    rename.add_argument("name", metavar="NAME", help="its new name")
    delete = _leaf(
        teams,
        "delete",
        "delete a team with no members (kept for the usage history, its name stays taken)",
        output,
        _delete_team,
    )
    delete.add_argument("team", metavar="TEAM", help="a team's id or name")
    budget = _leaf(
        teams,
        "budget",
        "set the team's own monthly cost budget (else: its members' budgets summed)",
        output,
        _set_team_budget,
    )
    budget.add_argument("team", metavar="TEAM", help="a team's id or name")
    amount = budget.add_mutually_exclusive_group(required=True)
    amount.add_argument("--usd", type=float, help="US dollars a month, e.g. 500")
    amount.add_argument(
        "--none", action="store_true", help="clear it: the members' budgets summed again"
    )

    users = _group(commands, "users", "create, list, change, disable and delete users")
    create = _leaf(users, "create", "create a user", output, _create_user)
    create.add_argument("--name", required=True)
    create.add_argument("--email", required=True)
    create.add_argument("--tier", help="a tier from the settings (default: accounts.default_tier)")
    create.add_argument("--team", metavar="TEAM", help="a team's id or name")
    listing = _leaf(users, "list", "list users", output, _list_users)
    listing.add_argument("--team", metavar="TEAM", help="only this team's (id or name)")
    update = _leaf(users, "update", "change a user", output, _update_user)
    update.add_argument("user_id", metavar="ID")
    update.add_argument("--name")
    update.add_argument("--email")
    update.add_argument("--tier")
    update.add_argument("--team", metavar="TEAM", help="a team's id or name")
    update.add_argument("--status", choices=("active", "disabled"))
    update.add_argument(
        "--override",
        metavar="KEY=VALUE",
        nargs="+",
        action="extend",
        default=[],
        help=f"set a limit for this user alone: KEY one of {', '.join(OVERRIDABLE)}; VALUE a "
        f"number >= 0, {UNLIMITED!r} (no limit) or {DEFAULT!r} (the tier's limit again)",
    )
    disable = _leaf(users, "disable", "disable a user: their keys stop working", output, _disable)
    disable.add_argument("user_id", metavar="ID")
    renamed = _leaf(users, "rename", "rename a user", output, _rename_user)
    renamed.add_argument("user_id", metavar="ID")
    renamed.add_argument("name", metavar="NAME", help="their new name")
    delete = _leaf(
        users,
        "delete",
        "delete a user: every key of theirs is revoked; their record and usage history are kept",
        output,
        _delete_user,
    )
    delete.add_argument("user_id", metavar="ID")

    keys = _group(commands, "keys", "create, list and revoke API keys")
    create = _leaf(keys, "create", "create an API key; its secret is shown once", output, _new_key)
    create.add_argument("--user", required=True, metavar="ID", help="the owner's user id")
    create.add_argument("--name", default="default", help="a label (default: default)")
    expiry = create.add_mutually_exclusive_group()
    expiry.add_argument("--expires-days", type=_positive_int, metavar="N", help="expire in N days")
    expiry.add_argument(
        "--expires",
        type=_future_time,
        metavar="TIME",
        help="expire at TIME (RFC 3339, e.g. 2027-01-31T00:00:00Z; a date means its midnight UTC)",
    )
    create.add_argument(
        "--budget", type=_usd, metavar="USD", help="the key's own monthly cost budget, in dollars"
    )
    create.add_argument(
        "--models",
        metavar="M1,M2",
        help="the only models (or aliases) it may use, comma-separated (default: its tier's)",
    )
    create.add_argument("--rpm", type=_count, metavar="N", help="its own requests per minute")
    create.add_argument("--tpm", type=_count, metavar="N", help="its own tokens per minute")
    listing = _leaf(keys, "list", "list API keys (never their secrets)", output, _list_keys)
    listing.add_argument("--user", metavar="ID", help="only this user's")
    revoke = _leaf(keys, "revoke", "revoke an API key", output, _revoke_key)
    revoke.add_argument("key_id", metavar="KEY_ID")


def _group(
    commands: argparse._SubParsersAction[Any], name: str, summary: str
) -> argparse._SubParsersAction[Any]:
    parser = commands.add_parser(name, help=summary, description=summary.capitalize() + ".")
    actions: argparse._SubParsersAction[Any] = parser.add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    return actions


def _leaf(
    group: argparse._SubParsersAction[Any],
    name: str,
    summary: str,
    output: argparse.ArgumentParser,
    action: Action,
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = group.add_parser(
        name, parents=[output], help=summary, description=summary.capitalize() + "."
    )
    parser.set_defaults(func=_handler(action))
    return parser


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of days >= 1, got {text!r}")
    return int(text)


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return int(text)


def _usd(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 1e9:  # also refuses nan
        raise argparse.ArgumentTypeError(
            f"expected US dollars 0..1e9, e.g. 25 or 2.50, got {text!r}"
        )
    return value


def _future_time(text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an RFC 3339 time such as 2027-01-31T00:00:00Z, got {text!r}"
        ) from None
    if when.tzinfo is None:
        if len(text.strip()) > 10:  # a time without an offset is ambiguous
            raise argparse.ArgumentTypeError(f"give {text!r} a UTC offset (Z or +01:00)")
        when = when.replace(tzinfo=UTC)
    if when <= datetime.now(UTC):
        raise argparse.ArgumentTypeError(f"{text!r} is not in the future")
    return when


# -- running ----------------------------------------------------------------------------------


def _handler(action: Action) -> Handler:
    """A command handler: open the store, run ``action``, print its result, map errors."""

    def handle(args: argparse.Namespace, settings: Settings) -> int:
        try:
            result = asyncio.run(_with_store(action, args, settings))
        except StoreUnavailable as exc:
            return _fail(str(exc), 1)
        except (LookupError, ValueError) as exc:  # NotFoundError, ConflictError, bad values
            return _fail(str(exc), 2)
        _print(result, args.json)
        return 0

    return handle


async def _with_store(action: Action, args: argparse.Namespace, settings: Settings) -> object:
    from citadel.accounts.sql import open_store
    from citadel.stores.sql import database_url

    uri = settings.accounts.database
    store = await open_store(uri, migrate=database_url(uri).startswith("sqlite"))
    try:
        return await action(store, args, settings)
    finally:
        await store.aclose()


def _fail(message: str, status: int) -> int:
    print(f"citadel: {message}", file=sys.stderr)
    return status


def _cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from sqlalchemy.ext.asyncio import AsyncEngine

    from citadel.accounts.migrate import ACCOUNTS
    from citadel.metering.ledger import rebuild_rollups
    from citadel.metering.migrate import LEDGER
    from citadel.migrations import Upgrade
    from citadel.stores.sql import build_engine, translate_errors

    uri = settings.accounts.database

    async def upgrade_and_rebuild(engine: AsyncEngine) -> Upgrade:
        done = await LEDGER.upgrade_engine(engine)
        await rebuild_rollups(engine)
        return done

    async def migrate(database: str, upgrade: Callable[[AsyncEngine], Awaitable[Upgrade]]) -> Any:
        engine = build_engine(database)
        try:
            with translate_errors():
                done = await upgrade(engine)
        finally:
            await engine.dispose()
        return {
            "database": engine.url.render_as_string(),
            "before": done.before,
            "after": done.after,
        }

    async def run() -> dict[str, Any]:
        # The accounts first, then the usage ledger (in the same database unless metering.database).
        result = await migrate(uri, ACCOUNTS.upgrade_engine)
        ledger = upgrade_and_rebuild if args.rebuild_rollups else LEDGER.upgrade_engine
        result["metering"] = await migrate(settings.metering.database or uri, ledger)
        result["metering"]["rollups_rebuilt"] = args.rebuild_rollups
        return dict(result)

    try:
        result = asyncio.run(run())
    except StoreUnavailable as exc:
        return _fail(str(exc), 1)
    if args.json:
        sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    for part, done in (("accounts", result), ("metering", result["metering"])):
        where = f"{part} {done['database']}"
        if done["before"] == done["after"]:
            print(f"{where}: already at revision {done['after']}")
        else:
            before = done["before"] or "empty"
            print(f"{where}: upgraded from {before} to revision {done['after']}")
    if args.rebuild_rollups:
        print(f"metering {result['metering']['database']}: rollups rebuilt from the events")
    return 0


# -- actions ----------------------------------------------------------------------------------


async def _create_team(store: AccountStore, args: argparse.Namespace, _: Settings) -> Team:
    return await store.create_team(args.name)


async def _list_teams(store: AccountStore, args: argparse.Namespace, _: Settings) -> list[Team]:
    return await store.list_teams()


async def _set_team_budget(store: AccountStore, args: argparse.Namespace, _: Settings) -> Team:
    team_id = await _team_id(store, args.team)
    if args.none:
        return await store.set_team_budget(team_id, None)
    usd = args.usd
    if not math.isfinite(usd) or usd < 0:
        raise ValueError(f"--usd {usd!r}: expected US dollars >= 0")
    return await store.set_team_budget(team_id, round(usd * 1_000_000))


async def _rename(store: AccountStore, args: argparse.Namespace, _: Settings) -> Team:
    return await store.rename_team(await _team_id(store, args.team), args.name)


async def _delete_team(store: AccountStore, args: argparse.Namespace, _: Settings) -> Team:
    return await store.delete_team(await _team_id(store, args.team))


async def _rename_user(store: AccountStore, args: argparse.Namespace, _: Settings) -> User:
    return await store.update_user(args.user_id, name=args.name)


async def _delete_user(store: AccountStore, args: argparse.Namespace, _: Settings) -> User:
    return await store.delete_user(args.user_id)


async def _create_user(store: AccountStore, args: argparse.Namespace, s: Settings) -> User:
    tier = _tier(args.tier or s.accounts.default_tier, s)
    team_id = await _team_id(store, args.team) if args.team is not None else None
    return await store.create_user(name=args.name, email=args.email, tier=tier, team_id=team_id)


async def _list_users(store: AccountStore, args: argparse.Namespace, _: Settings) -> list[User]:
    team_id = await _team_id(store, args.team) if args.team is not None else None
    return await store.list_users(team_id=team_id)


async def _update_user(store: AccountStore, args: argparse.Namespace, s: Settings) -> User:
    tier = _tier(args.tier, s) if args.tier is not None else None
    changes = _parse_overrides(args.override)  # checked before anything is read or written
    team_id = await _team_id(store, args.team) if args.team is not None else None
    overrides = None
    if changes:
        user = await store.get_user(args.user_id)
        if user is None:
            raise NotFoundError(f"no user has id {args.user_id!r}")
        overrides = dict(user.overrides)
        for name, value in changes.items():
            if value == DEFAULT:
                overrides.pop(name, None)
            else:
                overrides[name] = None if value == UNLIMITED else float(value)
    return await store.update_user(
        args.user_id,
        name=args.name,
        email=args.email,
        tier=tier,
        team_id=team_id,
        status=args.status,
        overrides=overrides,
    )


async def _disable(store: AccountStore, args: argparse.Namespace, _: Settings) -> User:
    return await store.update_user(args.user_id, status="disabled")


async def _new_key(
    store: AccountStore, args: argparse.Namespace, settings: Settings
) -> tuple[ApiKey, str]:
    expires = args.expires
    if args.expires_days is not None:
        expires = datetime.now(UTC) + timedelta(days=args.expires_days)
    models: tuple[str, ...] | None = None
    if args.models is not None:
        models = tuple(name.strip() for name in args.models.split(",") if name.strip())
        if not models:
            raise ValueError(f"--models {args.models!r}: expected model names, comma-separated")
        for name in models:
            if settings.model(name) is None:
                known = ", ".join(m.name for m in settings.models)
                raise ValueError(f"--models: {name!r} is not a configured model (models: {known})")
    limits = KeyLimits(
        budget_micros=None if args.budget is None else round(args.budget * 1_000_000),
        models=models,
        requests_per_minute=args.rpm,
        tokens_per_minute=args.tpm,
    )
    return await store.create_key(args.user, name=args.name, expires_at=expires, limits=limits)


async def _list_keys(store: AccountStore, args: argparse.Namespace, _: Settings) -> list[ApiKey]:
    if args.user is not None and await store.get_user(args.user) is None:
        raise NotFoundError(f"no user has id {args.user!r}")
    return await store.list_keys(user_id=args.user)


async def _revoke_key(store: AccountStore, args: argparse.Namespace, _: Settings) -> ApiKey:
    return await store.revoke_key(args.key_id)


# -- values -----------------------------------------------------------------------------------


def _tier(name: str, settings: Settings) -> str:
    if settings.tier(name) is None:
        names = ", ".join(t.name for t in settings.tiers)
        raise ValueError(f"tier {name!r}: expected one of {names}")
    return name


async def _team_id(store: AccountStore, team: str) -> str:
    """The id of the team with this id or, failing that, this name."""
    teams = await store.list_teams()
    found = next((t for t in teams if t.id == team), None) or next(
        (t for t in teams if t.name == team), None
    )
    if found is None:
        raise NotFoundError(f"no team has id or name {team!r}")
    return found.id


def _parse_overrides(items: Sequence[str]) -> dict[str, float | str]:
    """``KEY=VALUE`` items as {key: number, UNLIMITED or DEFAULT}; ValueError naming a bad one."""
    from citadel.accounts.sql import checked_overrides

    parsed: dict[str, float | str] = {}
    for item in items:
        name, sep, text = item.partition("=")
        name, text = name.strip(), text.strip()
        if not sep or name not in OVERRIDABLE:
            raise ValueError(
                f"override {item!r}: expected KEY=VALUE with KEY one of {', '.join(OVERRIDABLE)}"
            )
        if text.lower() in (UNLIMITED, DEFAULT):
            parsed[name] = text.lower()
            continue
        whole = name not in _FRACTIONAL
        expected = "a whole number >= 0" if whole else "a number >= 0"
        try:
            value = float(text)
            checked_overrides({name: value})
        except ValueError:
            value = -1.0
        if value < 0 or (whole and not value.is_integer()):
            raise ValueError(
                f"override {item!r}: expected {expected}, {UNLIMITED!r} or {DEFAULT!r}"
            )
        parsed[name] = value
    return parsed


# -- output -----------------------------------------------------------------------------------


def _print(result: object, as_json: bool) -> None:
    if isinstance(result, tuple):  # a new key and its secret
        key, secret = result
        print(
            "citadel: warning: this is the only time the secret is shown; it cannot be shown "
            "again. Store it now.",
            file=sys.stderr,
        )
        if as_json:
            _print_json({"key": key, "secret": secret})
        else:
            _print_table([key])
            print(f"\nsecret: {secret}")
    elif as_json:
        _print_json(result)
    else:
        _print_table(result if isinstance(result, list) else [result])


def _print_json(value: object) -> None:
    data = orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_UTC_Z)
    sys.stdout.write(data.decode() + "\n")


def _print_table(records: Sequence[object]) -> None:
    if not records:
        print("(none)")
        return
    rows = [_columns(record) for record in records]
    headers = list(rows[0])
    cells = [[row[h] for h in headers] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    for line in [[h.upper() for h in headers], *cells]:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        )


def _columns(record: object) -> dict[str, str]:
    if isinstance(record, Team):
        budget = record.budget_micros
        return {
            "id": record.id,
            "name": record.name,
            "created": _time(record.created_at),
            "budget": "-" if budget is None else f"${budget / 1_000_000:g}",
        }
    if isinstance(record, User):
        return {
            "id": record.id,
            "name": record.name,
            "email": record.email,
            "team": record.team_id or "-",
            "tier": record.tier,
            "status": "deleted" if record.deleted_at is not None else record.status,
            "created": _time(record.created_at),
            "overrides": ", ".join(f"{k}={_limit(v)}" for k, v in record.overrides.items()) or "-",
        }
    if isinstance(record, ApiKey):
        return {
            "id": record.id,
            "user": record.user_id,
            "name": record.name,
            "prefix": record.prefix + "...",
            "status": _key_status(record, datetime.now(UTC)),
            "created": _time(record.created_at),
            "last used": _time(record.last_used_at),
            "expires": _time(record.expires_at),
            "limits": _key_limits(record.limits),
        }
    raise TypeError(f"cannot show {record!r}")  # pragma: no cover


def _key_limits(limits: KeyLimits) -> str:
    parts = []
    if limits.budget_micros is not None:
        parts.append(f"budget=${limits.budget_micros / 1_000_000:g}")
    if limits.requests_per_minute is not None:
        parts.append(f"rpm={limits.requests_per_minute}")
    if limits.tokens_per_minute is not None:
        parts.append(f"tpm={limits.tokens_per_minute}")
    if limits.models is not None:
        parts.append("models=" + ",".join(limits.models))
    return " ".join(parts) or "-"


def _key_status(key: ApiKey, now: datetime) -> str:
    if key.revoked_at is not None:
        return "revoked"
    if key.expires_at is not None and key.expires_at <= now:
        return "expired"
    return "active"


def _time(value: datetime | None) -> str:
    return "-" if value is None else value.strftime("%Y-%m-%d %H:%M:%SZ")


def _limit(value: float | None) -> str:
    if value is None:
        return UNLIMITED
    return str(int(value)) if value.is_integer() else str(value)
