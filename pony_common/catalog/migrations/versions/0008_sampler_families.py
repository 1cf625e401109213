"""sampler families and adapters (issue 18): placeholder, filled by the sampler work.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30 00:00:00.000000
"""

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
