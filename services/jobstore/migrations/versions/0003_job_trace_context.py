"""jobs.trace_parent: the trace context of the call that created the job

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 15:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # W3C traceparent ("00-<trace id>-<span id>-<flags>", 55 characters); empty when tracing is off.
    op.add_column("jobs", sa.Column("trace_parent", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("trace_parent")
