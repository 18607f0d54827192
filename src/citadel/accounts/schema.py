"""The accounts tables: teams, users and API keys, as SQLAlchemy 2 declarative mappings.

These classes describe the tables for queries and for Alembic's autogenerate; the tables
themselves are created and changed only by the migrations in ``migrations/versions``.

Every timestamp is a timezone-aware UTC ``datetime`` in Python. PostgreSQL stores it as
``timestamptz``; SQLite has no such type, so ``UtcDateTime`` writes UTC wall time and reads it
back as UTC. Ids are short random strings with a prefix that says what they name.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Dialect,
    ForeignKey,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Constraint and index names fixed by convention, so migrations can name what they change.
NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_name)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

USER_PREFIX, TEAM_PREFIX, KEY_PREFIX = "usr_", "team_", "key_"


def new_id(prefix: str) -> str:
    """A fresh id: the prefix and 16 random hex digits (64 bits)."""
    return prefix + secrets.token_hex(8)


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend; a naive one is refused when written."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"datetime {value.isoformat()} has no timezone: expected an aware one")
        value = value.astimezone(UTC)
        # SQLite's DATETIME is text without an offset: store UTC wall time.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# JSONB on PostgreSQL (compact, indexable), JSON text elsewhere.
Overrides = JSON().with_variant(JSONB(), "postgresql")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UtcDateTime()}


class TeamRow(Base):
    __tablename__ = "teams"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(Text, unique=True)
    created_at: Mapped[datetime]
    # The team's own monthly cost budget in micro-USD (0002); NULL: its members' budgets summed.
    budget_micros: Mapped[int | None] = mapped_column(BigInteger)
    # When it was deleted (0004); NULL: not deleted. Kept so the ledger's team ids resolve.
    deleted_at: Mapped[datetime | None]


class UserRow(Base):
    __tablename__ = "users"
    __table_args__ = (CheckConstraint("status IN ('active', 'disabled')", name="status"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(Text)
    email: Mapped[str] = mapped_column(Text, unique=True)
    team_id: Mapped[str | None] = mapped_column(ForeignKey("teams.id"), index=True)
    tier: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime]
    overrides: Mapped[dict[str, float | None]] = mapped_column(Overrides)
    # When it was deleted (0004); NULL: not deleted. Kept so the ledger's user ids resolve.
    deleted_at: Mapped[datetime | None]


class ApiKeyRow(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id"), index=True)
    name: Mapped[str] = mapped_column(Text)
    # SHA-256 of the secret: what authentication looks up, so uniquely indexed.
    digest: Mapped[bytes] = mapped_column(LargeBinary(32), unique=True, index=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime]
    last_used_at: Mapped[datetime | None]
    expires_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]
    # The key's own limits (0003); NULL: none beyond its owner's.
    budget_micros: Mapped[int | None] = mapped_column(BigInteger)
    models: Mapped[list[str] | None] = mapped_column(Overrides)  # the models it may use
    requests_per_minute: Mapped[int | None] = mapped_column(BigInteger)
    tokens_per_minute: Mapped[int | None] = mapped_column(BigInteger)
