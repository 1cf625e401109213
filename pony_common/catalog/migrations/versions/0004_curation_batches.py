"""curation batches (issue 14): no schema change; the batch claim (INSERT … ON CONFLICT (image_id, stage) DO UPDATE
… WHERE status <> 'done' RETURNING) and the bulk reads by image id use the existing primary keys of `stages`,
`embeddings`, `aesthetic_scores`, `safety_decisions` and the `captions` image index. Kept so the chain stays linear.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 00:00:00.000000
"""

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
