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
    op.add_column("jobs", sa.Column("keep_audio", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.add_column("jobs", sa.Column("audio_retained", sa.Boolean(), nullable=False, server_default=sa.true()))
    # Quota counts: a tenant's stored audio and its queued jobs.
    op.create_index("ix_jobs_tenant_status", "jobs", ["tenant", "status"])


def downgrade() -> None:
    op.drop_index("ix_jobs_tenant_status", table_name="jobs")
    op.drop_column("jobs", "audio_retained")
    op.drop_column("jobs", "keep_audio")
