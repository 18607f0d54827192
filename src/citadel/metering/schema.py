"""The usage ledger's tables, as SQLAlchemy Core: one row per event, and rollups kept beside it.

These describe the tables for queries (the analytics service reads them) and for Alembic's
autogenerate; the tables themselves are created and changed only by ``migrations/versions``.

``usage_events`` is the ledger: one row per usage event, keyed by the event id the gateway gave
it, so storing an event twice stores it once. ``usage_hourly`` and ``usage_daily`` are rollups
of the ledger by (bucket, user, team, model, deployment, tier); beside them, narrower rollups
keep the same sums by fewer columns, each hourly and daily: ``usage_*_team`` by (team, tier,
model), ``usage_*_deployment`` by (model, deployment, tier) and ``usage_*_user`` by (user, team,
tier). The ledger writer adds each event to every rollup in the same transaction that inserts
it, and only when the insert really added the row, so a redelivered event is counted once. The
bucket is the UTC hour (``usage_hourly*``) or the UTC day (``usage_daily*``) the request started
in. Analytics read the rollups, whose size grows with hours x distinct keys, not with requests;
a question that names no user (cost by team, say) reads a rollup without the user column, tens
of times smaller than the full one.

Ids and names that rows are grouped and looked up by (``Key``) compare bytewise on PostgreSQL
(``COLLATE "C"``): they are ASCII identifiers, and the database's natural-language collation
would only make every index insert slower.

Every timestamp is a timezone-aware UTC ``datetime`` in Python (``UtcDateTime``: ``timestamptz``
on PostgreSQL, UTC wall time on SQLite). An event without a team has ``team_id = ''``: the
rollups' key columns are never NULL (NULLs would break their primary key and ON CONFLICT).

Every request the gateway answered for a principal is an event, refused and failed ones included
(``citadel.metering.events``): the rollups count ``errors`` (status >= 400), ``refusals`` (the
tier's or the limits' refusals) and ``failures`` (status >= 500) beside ``requests``, so error and
refusal rates come from the rollups too.
"""

from __future__ import annotations

from sqlalchemy import (
    REAL,
    BigInteger,
    Boolean,
    Column,
    Double,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    SmallInteger,
    Table,
    Text,
    false,
)

from citadel.accounts.schema import NAMING, UtcDateTime

__all__ = [
    "FULL_KEY",
    "MEASURES",
    "NARROW_KEYS",
    "ROLLUPS",
    "metadata",
    "rollup_key",
    "usage_daily",
    "usage_daily_deployment",
    "usage_daily_team",
    "usage_daily_user",
    "usage_events",
    "usage_hourly",
    "usage_hourly_deployment",
    "usage_hourly_team",
    "usage_hourly_user",
]

metadata = MetaData(naming_convention=NAMING)

# Text compared byte by byte on PostgreSQL (see the module docstring); plain text on SQLite.
Key = Text().with_variant(Text(collation="C"), "postgresql")

usage_events = Table(
    "usage_events",
    metadata,
    Column("event_id", Key, primary_key=True),  # 32 hex digits, from the gateway
    Column("ts", UtcDateTime(), nullable=False),  # when the request started
    Column("request_id", Key, nullable=False),
    Column("user_id", Key, nullable=False),
    Column("team_id", Key, nullable=False),  # '' when the user has no team
    Column("key_id", Key, nullable=False),
    Column("tier", Key, nullable=False),
    Column("endpoint", Key, nullable=False),  # e.g. /v1/chat/completions
    Column("model", Key, nullable=False),
    Column("deployment", Key, nullable=False),
    Column("prompt_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("latency_ms", REAL, nullable=False),
    Column("ttft_ms", REAL, nullable=True),  # streamed requests only
    Column("status", SmallInteger, nullable=False),  # the HTTP status returned to the client
    Column("streamed", Boolean, nullable=False),
    Column("cancelled", Boolean, nullable=False),
    Column("usage_estimated", Boolean, nullable=False),
    Column("cost_micros", BigInteger, nullable=False),  # micro-USD charged
    # Why a request was not served (the error's code), '' when it was (m0004).
    Column("reason", Key, nullable=False, server_default=""),
    # Refused by the caller's tier or limits, before any upstream was tried (m0004).
    Column("refused", Boolean, nullable=False, server_default=false()),
    PrimaryKeyConstraint("event_id", name="pk_usage_events"),
    # Time ranges only (retention, rebuilds): by-team and by-user questions read the rollups.
    Index("ix_usage_events_ts", "ts"),
)


# The key of the full rollups, and of each narrower one (bucket first, always).
FULL_KEY = ("user_id", "team_id", "model", "deployment", "tier")
NARROW_KEYS: dict[str, tuple[str, ...]] = {
    "team": ("team_id", "tier", "model"),  # by team, model or tier: no user, no deployment
    "deployment": ("model", "deployment", "tier"),  # by model, deployment or tier
    "user": ("user_id", "team_id", "tier"),  # by user (budgets, top users, active users)
}
# The sums every rollup keeps, in this order.
MEASURES = (
    "requests",
    "errors",
    "prompt_tokens",
    "completion_tokens",
    "cost_micros",
    "latency_ms_sum",
    "ttft_ms_sum",
    "ttft_requests",
    "refusals",
    "failures",
)


def _rollup(name: str, key: tuple[str, ...]) -> Table:
    return Table(
        name,
        metadata,
        Column("bucket", UtcDateTime(), nullable=False),  # start of the UTC hour or day
        *(Column(k, Key, nullable=False) for k in key),
        Column("requests", BigInteger, nullable=False),
        Column("errors", BigInteger, nullable=False),  # requests with status >= 400
        Column("prompt_tokens", BigInteger, nullable=False),
        Column("completion_tokens", BigInteger, nullable=False),
        Column("cost_micros", BigInteger, nullable=False),
        Column("latency_ms_sum", Double, nullable=False),  # mean latency: sum / requests
        Column("ttft_ms_sum", Double, nullable=False),  # mean TTFT: sum / ttft_requests
        Column("ttft_requests", BigInteger, nullable=False),  # requests that reported a TTFT
        # Requests refused by the tier or limits (``usage_events.refused``), and those that
        # failed (status >= 500: upstream errors, timeouts, no deployment available); m0004.
        Column("refusals", BigInteger, nullable=False, server_default="0"),
        Column("failures", BigInteger, nullable=False, server_default="0"),
        PrimaryKeyConstraint("bucket", *key, name=f"pk_{name}"),
    )


usage_hourly = _rollup("usage_hourly", FULL_KEY)
usage_daily = _rollup("usage_daily", FULL_KEY)
usage_hourly_team = _rollup("usage_hourly_team", NARROW_KEYS["team"])
usage_daily_team = _rollup("usage_daily_team", NARROW_KEYS["team"])
usage_hourly_deployment = _rollup("usage_hourly_deployment", NARROW_KEYS["deployment"])
usage_daily_deployment = _rollup("usage_daily_deployment", NARROW_KEYS["deployment"])
usage_hourly_user = _rollup("usage_hourly_user", NARROW_KEYS["user"])
usage_daily_user = _rollup("usage_daily_user", NARROW_KEYS["user"])

HOUR, DAY = 3600, 86400
# Each rollup table and the width of its bucket, in seconds (UTC hours and days): the full ones
# first (the narrower ones are sums of them).
ROLLUPS: tuple[tuple[Table, int], ...] = (
    (usage_hourly, HOUR),
    (usage_daily, DAY),
    (usage_hourly_team, HOUR),
    (usage_daily_team, DAY),
    (usage_hourly_deployment, HOUR),
    (usage_daily_deployment, DAY),
    (usage_hourly_user, HOUR),
    (usage_daily_user, DAY),
)


def rollup_key(table: Table) -> tuple[str, ...]:
    """The key columns of a rollup, bucket excepted, in the order of its primary key."""
    return tuple(c.name for c in table.primary_key.columns if c.name != "bucket")
