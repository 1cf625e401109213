"""catalog select and status at 1M+ rows (issue 14): what `select` and `status` read, kept up to date by the database.

- images.score (a copy of aesthetic_scores.score) and images.safety_allowed (safety_decisions.decision = 'allow'),
  copied by triggers on those tables, so the selection pool is ONE partial index (`ix_images_pool`: category, score
  desc, id in byte order) instead of three joined tables;
- images.dup_stale: set by a trigger when a grouped image's group, status or score changes (what decides which
  member of a near-duplicate group stays eligible); `select` resolves only the stale groups, not every group;
- stage_counts: per (stage, status) deltas of the stage ledger written by triggers on `stages` (PostgreSQL: one
  row per statement and key, compacted by `status`; SQLite: one row per key), so `status` does not count the ledger;
  indexes (stage, status, started_at) and (stage, status, finished_at) give its throughput spans;
- selections.image_id loses its foreign key (checking it locked every chosen image row: 4.6 s of a 101k-image
  selection); `select` writes only ids it reads from images in the same statement, and deleting an image still
  deletes its selection rows (a trigger, as ON DELETE CASCADE did).

The upgrade backfills every new column and table from the rows already there, and resolves every near-duplicate group
once (as every `select` did before), so none starts stale.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 00:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

# The name PostgreSQL gave the foreign key of 0001 (SQLite's is unnamed: the convention names it for batch mode).
SELECTIONS_FK = "selections_image_id_fkey"
NAMING = {"fk": "%(table_name)s_%(column_0_name)s_fkey"}
# The pool predicate; `services/curation/selection.py` queries with the same terms so the partial index applies.
POOL_WHERE_PG = "status = 'done' AND is_duplicate = false AND safety_allowed = true AND score IS NOT NULL"
POOL_WHERE_SQLITE = "status = 'done' AND is_duplicate = 0 AND safety_allowed = 1 AND score IS NOT NULL"

PG_FUNCTIONS = {
    "pony_copy_score": """
        BEGIN
          IF TG_OP = 'DELETE' THEN
            UPDATE images SET score = NULL WHERE id = OLD.image_id AND score IS NOT NULL;
            RETURN OLD;
          END IF;
          UPDATE images SET score = NEW.score WHERE id = NEW.image_id AND score IS DISTINCT FROM NEW.score;
          RETURN NEW;
        END""",
    "pony_copy_safety": """
        BEGIN
          IF TG_OP = 'DELETE' THEN
            UPDATE images SET safety_allowed = false WHERE id = OLD.image_id AND safety_allowed;
            RETURN OLD;
          END IF;
          UPDATE images SET safety_allowed = (NEW.decision = 'allow')
            WHERE id = NEW.image_id AND safety_allowed IS DISTINCT FROM (NEW.decision = 'allow');
          RETURN NEW;
        END""",
    "pony_mark_dup_stale": """
        BEGIN
          IF NEW.dup_group IS NOT NULL OR NEW.is_duplicate THEN
            NEW.dup_stale := true;
          END IF;
          RETURN NEW;
        END""",
    "pony_delete_selections": """
        BEGIN
          DELETE FROM selections WHERE image_id = OLD.id;
          RETURN OLD;
        END""",
    "pony_count_stages_insert": """
        BEGIN
          INSERT INTO stage_counts (stage, status, n)
            SELECT stage, status, count(*) FROM new_rows GROUP BY stage, status;
          RETURN NULL;
        END""",
    "pony_count_stages_update": """
        BEGIN
          INSERT INTO stage_counts (stage, status, n)
            SELECT stage, status, sum(d) FROM (
              SELECT stage, status, -1 AS d FROM old_rows UNION ALL SELECT stage, status, 1 FROM new_rows
            ) AS t GROUP BY stage, status HAVING sum(d) <> 0;
          RETURN NULL;
        END""",
    "pony_count_stages_delete": """
        BEGIN
          INSERT INTO stage_counts (stage, status, n)
            SELECT stage, status, -count(*) FROM old_rows GROUP BY stage, status;
          RETURN NULL;
        END""",
    "pony_count_stages_truncate": """
        BEGIN
          DELETE FROM stage_counts;
          RETURN NULL;
        END""",
}

PG_TRIGGERS = {
    "aesthetic_scores_copy_score": (
        "AFTER INSERT OR UPDATE OF score OR DELETE ON aesthetic_scores FOR EACH ROW",
        "pony_copy_score",
    ),
    "safety_decisions_copy_safety": (
        "AFTER INSERT OR UPDATE OF decision OR DELETE ON safety_decisions FOR EACH ROW",
        "pony_copy_safety",
    ),
    "images_dup_stale_update": (
        "BEFORE UPDATE OF dup_group, status, score ON images FOR EACH ROW WHEN ("
        "OLD.dup_group IS DISTINCT FROM NEW.dup_group OR OLD.status IS DISTINCT FROM NEW.status "
        "OR OLD.score IS DISTINCT FROM NEW.score)",
        "pony_mark_dup_stale",
    ),
    "images_dup_stale_insert": (
        "BEFORE INSERT ON images FOR EACH ROW WHEN (NEW.dup_group IS NOT NULL)",
        "pony_mark_dup_stale",
    ),
    "images_delete_selections": ("AFTER DELETE ON images FOR EACH ROW", "pony_delete_selections"),
    "stages_count_insert": (
        "AFTER INSERT ON stages REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT",
        "pony_count_stages_insert",
    ),
    "stages_count_update": (
        "AFTER UPDATE ON stages REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT",
        "pony_count_stages_update",
    ),
    "stages_count_delete": (
        "AFTER DELETE ON stages REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT",
        "pony_count_stages_delete",
    ),
    "stages_count_truncate": ("AFTER TRUNCATE ON stages FOR EACH STATEMENT", "pony_count_stages_truncate"),
}

# SQLite: row triggers; one stage_counts row per key (SQLite has one writer at a time, so no row is contended).
_SQLITE_COUNT = """
    INSERT INTO stage_counts (stage, status, n) SELECT {row}.stage, {row}.status, 0
      WHERE NOT EXISTS (SELECT 1 FROM stage_counts WHERE stage = {row}.stage AND status = {row}.status);
    UPDATE stage_counts SET n = n {sign} 1 WHERE stage = {row}.stage AND status = {row}.status;"""
SQLITE_TRIGGERS = {
    "aesthetic_scores_copy_score_insert": (
        "AFTER INSERT ON aesthetic_scores",
        "UPDATE images SET score = NEW.score WHERE id = NEW.image_id;",
    ),
    "aesthetic_scores_copy_score_update": (
        "AFTER UPDATE OF score ON aesthetic_scores",
        "UPDATE images SET score = NEW.score WHERE id = NEW.image_id AND score IS NOT NEW.score;",
    ),
    "aesthetic_scores_copy_score_delete": (
        "AFTER DELETE ON aesthetic_scores",
        "UPDATE images SET score = NULL WHERE id = OLD.image_id;",
    ),
    "safety_decisions_copy_safety_insert": (
        "AFTER INSERT ON safety_decisions",
        "UPDATE images SET safety_allowed = (NEW.decision = 'allow') WHERE id = NEW.image_id;",
    ),
    "safety_decisions_copy_safety_update": (
        "AFTER UPDATE OF decision ON safety_decisions",
        "UPDATE images SET safety_allowed = (NEW.decision = 'allow') WHERE id = NEW.image_id;",
    ),
    "safety_decisions_copy_safety_delete": (
        "AFTER DELETE ON safety_decisions",
        "UPDATE images SET safety_allowed = 0 WHERE id = OLD.image_id;",
    ),
    "images_dup_stale_update": (
        "AFTER UPDATE OF dup_group, status, score ON images WHEN (OLD.dup_group IS NOT NEW.dup_group "
        "OR OLD.status IS NOT NEW.status OR OLD.score IS NOT NEW.score) "
        "AND (NEW.dup_group IS NOT NULL OR NEW.is_duplicate)",
        "UPDATE images SET dup_stale = 1 WHERE id = NEW.id;",
    ),
    "images_dup_stale_insert": (
        "AFTER INSERT ON images WHEN NEW.dup_group IS NOT NULL",
        "UPDATE images SET dup_stale = 1 WHERE id = NEW.id;",
    ),
    "images_delete_selections": ("AFTER DELETE ON images", "DELETE FROM selections WHERE image_id = OLD.id;"),
    "stages_count_insert": ("AFTER INSERT ON stages", _SQLITE_COUNT.format(row="NEW", sign="+")),
    "stages_count_update": (
        "AFTER UPDATE OF stage, status ON stages WHEN OLD.stage IS NOT NEW.stage OR OLD.status IS NOT NEW.status",
        _SQLITE_COUNT.format(row="OLD", sign="-") + _SQLITE_COUNT.format(row="NEW", sign="+"),
    ),
    "stages_count_delete": ("AFTER DELETE ON stages", _SQLITE_COUNT.format(row="OLD", sign="-")),
}

# One pass over the images (separate updates would write every row again): the copies, and is_duplicate resolved in
# every group as `services.curation.duplicates.resolve_duplicates` ranks members (failed never wins, then the score,
# unscored last, then the smaller id in byte order), so no group starts stale. UPDATE ... FROM: SQLite 3.33+.
BACKFILL = """
    UPDATE images SET score = s.score, safety_allowed = s.allowed, is_duplicate = s.duplicate, dup_stale = false
    FROM (SELECT i.id, a.score, coalesce(d.decision = 'allow', false) AS allowed,
                 CASE WHEN i.dup_group IS NULL THEN false ELSE row_number() OVER (
                   PARTITION BY i.dup_group
                   ORDER BY (i.status = 'failed'), coalesce(a.score, -1.0) DESC, i.id COLLATE {collation}
                 ) > 1 END AS duplicate
          FROM images AS i
          LEFT JOIN aesthetic_scores AS a ON a.image_id = i.id
          LEFT JOIN safety_decisions AS d ON d.image_id = i.id) AS s
    WHERE s.id = images.id AND (s.score IS NOT NULL OR s.allowed OR images.is_duplicate <> s.duplicate)"""
COUNT_BACKFILL = (
    "INSERT INTO stage_counts (stage, status, n) SELECT stage, status, count(*) FROM stages GROUP BY stage, status"
)


def upgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    # Plain ADD COLUMN, not batch mode: SQLite's batch mode would copy `images` and drop the old table, and with
    # foreign keys on, dropping it deletes every row that references an image (ON DELETE CASCADE).
    op.add_column("images", sa.Column("score", sa.Float(), nullable=True))
    op.add_column("images", sa.Column("safety_allowed", sa.Boolean(), server_default=sa.false(), nullable=False))
    op.add_column("images", sa.Column("dup_stale", sa.Boolean(), server_default=sa.false(), nullable=False))
    op.create_table(
        "stage_counts",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("stage", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("n", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_stage_counts_stage_status", "stage_counts", ["stage", "status"])
    with op.batch_alter_table("selections", naming_convention=NAMING) as batch_op:
        batch_op.drop_constraint(SELECTIONS_FK, type_="foreignkey")
    op.execute(BACKFILL.format(collation='"C"' if postgres else "BINARY"))
    op.execute(COUNT_BACKFILL)
    op.create_index(
        "ix_images_pool",
        "images",
        ["category", sa.text("score DESC"), sa.text('id COLLATE "C"' if postgres else "id")],
        postgresql_where=sa.text(POOL_WHERE_PG),
        sqlite_where=sa.text(POOL_WHERE_SQLITE),
    )
    op.create_index(
        "ix_images_dup_stale",
        "images",
        ["dup_group"],
        postgresql_where=sa.text("dup_stale"),
        sqlite_where=sa.text("dup_stale = 1"),
    )
    op.create_index("ix_stages_stage_status_started", "stages", ["stage", "status", "started_at"])
    op.create_index("ix_stages_stage_status_finished", "stages", ["stage", "status", "finished_at"])
    if postgres:
        for name, body in PG_FUNCTIONS.items():
            op.execute(f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $${body}\n$$")
        for name, (when, function) in PG_TRIGGERS.items():
            op.execute(f"CREATE TRIGGER {name} {when} EXECUTE FUNCTION {function}()")
    else:
        for name, (when, body) in SQLITE_TRIGGERS.items():
            op.execute(f"CREATE TRIGGER {name} {when} BEGIN {body} END")


def downgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    if postgres:
        for name, (when, _function) in PG_TRIGGERS.items():
            table = when.split(" ON ", 1)[1].split()[0]  # the table named after ON
            op.execute(f"DROP TRIGGER IF EXISTS {name} ON {table}")
        for name in PG_FUNCTIONS:
            op.execute(f"DROP FUNCTION IF EXISTS {name}()")
    else:
        for name in SQLITE_TRIGGERS:
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
    op.drop_index("ix_stages_stage_status_finished", table_name="stages")
    op.drop_index("ix_stages_stage_status_started", table_name="stages")
    op.drop_index("ix_images_dup_stale", table_name="images")
    op.drop_index("ix_images_pool", table_name="images")
    op.drop_index("ix_stage_counts_stage_status", table_name="stage_counts")
    with op.batch_alter_table("selections", naming_convention=NAMING) as batch_op:
        batch_op.create_foreign_key(SELECTIONS_FK, "images", ["image_id"], ["id"], ondelete="CASCADE")
    op.drop_table("stage_counts")
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.drop_column("dup_stale")
        batch_op.drop_column("safety_allowed")
        batch_op.drop_column("score")
