"""sampler families and adapters (issue 18): adapters registered by RegisterAdapter have no training run
(`run_id` nullable, still unique), RemoveAdapter marks a version removed (`removed_at`; its number is not reused),
and the A1111 LoRA hash (`tensor_sha256`: sha256 of the tensor data after the safetensors header).

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30 00:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("adapters") as batch:
        batch.alter_column("run_id", existing_type=sa.String(length=64), nullable=True)
        batch.add_column(sa.Column("tensor_sha256", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("removed_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    # Registered adapters have no run: 0007's table cannot hold them.
    op.execute("DELETE FROM adapters WHERE run_id IS NULL")
    with op.batch_alter_table("adapters") as batch:
        batch.drop_column("removed_at")
        batch.drop_column("tensor_sha256")
        batch.alter_column("run_id", existing_type=sa.String(length=64), nullable=False)
