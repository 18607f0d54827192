"""Narrower rollups beside the full ones: by team, by deployment and by user, hourly and daily.

Revision ID: m0002
Revises: m0001
Create Date: 2026-11-25

``usage_hourly`` and ``usage_daily`` are keyed by (bucket, user, team, model, deployment, tier),
so a question that names no user (cost by team over 30 days, say) still reads a row per user.
The new tables keep the same sums by fewer columns:

- ``usage_{hourly,daily}_team``: (bucket, team_id, tier, model);
- ``usage_{hourly,daily}_deployment``: (bucket, model, deployment, tier);
- ``usage_{hourly,daily}_user``: (bucket, user_id, team_id, tier).

Upgrading fills them from the full rollups of the same width (the same sums, summed again), in
the migration's transaction: stop the ledger writers while it runs, or a batch committed in
between could be missing from the new tables. Downgrading drops them.

Self-contained on purpose, like m0001: nothing is imported from ``citadel.metering``.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "m0002"
down_revision = "m0001"
branch_labels = None
depends_on = None

_TIMESTAMP = sa.DateTime(timezone=True)
_KEY = sa.Text().with_variant(sa.Text(collation="C"), "postgresql")
_NARROW = {
    "team": ("team_id", "tier", "model"),
    "deployment": ("model", "deployment", "tier"),
    "user": ("user_id", "team_id", "tier"),
}
_MEASURES = (
    "requests",
    "errors",
    "prompt_tokens",
    "completion_tokens",
    "cost_micros",
    "latency_ms_sum",
    "ttft_ms_sum",
    "ttft_requests",
)
_FLOATS = ("latency_ms_sum", "ttft_ms_sum")


def _tables() -> list[tuple[str, str, tuple[str, ...]]]:
    """(new table, the full rollup it is filled from, its key), in creation order."""
    return [
        (f"usage_{unit}_{name}", f"usage_{unit}", key)
        for name, key in _NARROW.items()
        for unit in ("hourly", "daily")
    ]


def upgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    sums = ", ".join(
        f"sum({m})" if m in _FLOATS else f"CAST(sum({m}) AS BIGINT)" for m in _MEASURES
    )
    for name, source, key in _tables():
        op.create_table(
            name,
            sa.Column("bucket", _TIMESTAMP, nullable=False),
            *(sa.Column(k, _KEY, nullable=False) for k in key),
            *(
                sa.Column(m, sa.Double() if m in _FLOATS else sa.BigInteger(), nullable=False)
                for m in _MEASURES
            ),
            sa.PrimaryKeyConstraint("bucket", *key, name=f"pk_{name}"),
        )
        if postgres:
            # Rollup rows are updated over and over: room on the page keeps updates HOT.
            op.execute(f"ALTER TABLE {name} SET (fillfactor = 70)")
        columns = ", ".join(key)
        op.execute(
            f"INSERT INTO {name} (bucket, {columns}, {', '.join(_MEASURES)}) "
            f"SELECT bucket, {columns}, {sums} FROM {source} GROUP BY bucket, {columns}"
        )


def downgrade() -> None:
    for name, _, _ in reversed(_tables()):
        op.drop_table(name)
