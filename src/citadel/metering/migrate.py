"""Bring a usage-ledger database up to the newest schema with Alembic, run from code.

The machinery is ``citadel.migrations`` (one transaction, behind a lock, no ``alembic.ini``); the
revisions are in ``citadel/metering/migrations``. The version is kept in its own table,
``alembic_version_metering``, so the ledger may share a database with the accounts tables (the
default) or live in one of its own.
"""

from __future__ import annotations

from sqlalchemy import MetaData

from citadel.migrations import Migrations

__all__ = ["LEDGER"]


def _metadata() -> MetaData:
    from citadel.metering.schema import metadata

    return metadata


LEDGER = Migrations(
    package="citadel.metering",
    version_table="alembic_version_metering",
    lock_id=0x6D_65_74_65_72_69_6E,  # "meterin"
    metadata=_metadata,
)
