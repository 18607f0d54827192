"""Bring an accounts database up to the newest schema with Alembic, run from code.

The machinery is ``citadel.migrations`` (one transaction, behind a lock, no ``alembic.ini``); the
revisions are in ``citadel/accounts/migrations``. The version is kept in its own table,
``alembic_version_accounts``, so other parts of Citadel may keep their own migrations in the same
database.
"""

from __future__ import annotations

from sqlalchemy import MetaData

from citadel.migrations import Migrations

__all__ = ["ACCOUNTS"]


def _metadata() -> MetaData:
    from citadel.accounts.schema import Base

    return Base.metadata


ACCOUNTS = Migrations(
    package="citadel.accounts",
    version_table="alembic_version_accounts",
    lock_id=0x63_69_74_61_64_65_6C,  # "citadel"
    metadata=_metadata,
)
