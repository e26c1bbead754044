"""audio retention: jobs.keep_audio and jobs.audio_retained

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 15:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("keep_audio", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("audio_retained", sa.Boolean(), nullable=False, server_default=sa.true()))
    # Quota counts: a tenant's stored audio and its queued jobs.
    op.create_index("ix_jobs_tenant_status", "jobs", ["tenant", "status"])


def downgrade() -> None:
    op.drop_index("ix_jobs_tenant_status", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("audio_retained")
        batch.drop_column("keep_audio")
