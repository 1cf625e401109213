"""catalog at 1M+ rows (issue 14 dedup and queries): images.phash_indexed marks pHashes already matched by the
incremental near-duplicate index; indexes for finding new pHashes, looking hashes up, counting duplicates and
reading a selection in rank order.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 00:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A plain ADD COLUMN (SQLite takes one with a constant default): batch mode would copy `images` and drop the old
    # table on SQLite, and with foreign keys on that drop cascades into every table that references an image.
    op.add_column("images", sa.Column("phash_indexed", sa.Boolean(), server_default=sa.false(), nullable=False))
    op.create_index("ix_images_phash", "images", ["phash"])
    op.create_index(
        "ix_images_phash_unindexed",
        "images",
        ["id"],
        postgresql_where=sa.text("phash IS NOT NULL AND NOT phash_indexed"),
        sqlite_where=sa.text("phash IS NOT NULL AND phash_indexed = 0"),
    )
    op.create_index(
        "ix_images_duplicates",
        "images",
        ["dup_group"],
        postgresql_where=sa.text("is_duplicate"),
        sqlite_where=sa.text("is_duplicate = 1"),
    )
    op.create_index("ix_selections_name_rank", "selections", ["name", "rank"])


def downgrade() -> None:
    op.drop_index("ix_selections_name_rank", table_name="selections")
    op.drop_index("ix_images_duplicates", table_name="images")
    op.drop_index("ix_images_phash_unindexed", table_name="images")
    op.drop_index("ix_images_phash", table_name="images")
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.drop_column("phash_indexed")
