"""style-adherence evaluations (issue 19): one row per evaluation of a model version, its files in the blob store

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30 00:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "evaluations",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=True),
        sa.Column("adapters", sa.JSON(), nullable=False),
        sa.Column("images", sa.Integer(), nullable=False),
        sa.Column("seconds", sa.Float(), nullable=False),
        sa.Column("follow_rate", sa.Float(), nullable=False),
        sa.Column("locking", sa.Float(), nullable=False),
        sa.Column("summary", sa.JSON(), nullable=False),
        sa.Column("json_uri", sa.Text(), nullable=False),
        sa.Column("parquet_uri", sa.Text(), nullable=False),
        sa.Column("html_uri", sa.Text(), nullable=False),
        sa.Column("verdict", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_evaluations_model", "evaluations", ["model"])


def downgrade() -> None:
    op.drop_index("ix_evaluations_model", table_name="evaluations")
    op.drop_table("evaluations")
