"""style-adherence evaluations (issue 19): placeholder, filled by the evaluation work.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30 00:00:00.000000
"""

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
