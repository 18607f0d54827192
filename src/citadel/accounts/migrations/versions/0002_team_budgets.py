"""A team's own monthly cost budget: ``teams.budget_micros``.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02

Budgets live in the accounts store, set at run time (``citadel teams budget``). A team's budget
was the sum of its members' tier budgets; a team with ``budget_micros`` set now has that one
instead (NULL, every existing team: the members' sum, as before). Adding a nullable column
rewrites nothing. Downgrading drops it.

Self-contained on purpose, like 0001: nothing is imported from ``citadel.accounts``.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("teams", sa.Column("budget_micros", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    op.drop_column("teams", "budget_micros")
