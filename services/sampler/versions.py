"""Model versions of `pony_v7` in the catalog (model_versions), kept in step with the Triton repository's folders."""

from __future__ import annotations

import logging

from sqlalchemy import select, update

from pony_common.catalog import Catalog, upsert
from pony_common.catalog.models import ModelVersionRow
from pony_common.errors import PonyError
from services.sampler.generation import MODEL_NAME
from services.sampler.repository import ModelRepository

log = logging.getLogger(__name__)


class VersionCatalog:
    """Rows of model_versions for `pony_v7`: one per repository version folder, the served one active."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def rows(self) -> dict[int, ModelVersionRow]:
        with self.catalog.session() as s:
            found = s.scalars(select(ModelVersionRow).where(ModelVersionRow.name == MODEL_NAME)).all()
            return {row.version: row for row in found}

    def record(self, version: int, uri: str, source_run_id: str = "", *, active: bool = True) -> None:
        """Upserts the row (a trainer that recorded it first keeps its run id) and makes it the active one."""
        with self.catalog.session() as s:
            values = {"name": MODEL_NAME, "version": version, "uri": uri, "active": active}
            if source_run_id:
                values["source_run_id"] = source_run_id
            upsert(s, ModelVersionRow, values, keys=["name", "version"])
            if active:
                s.execute(
                    update(ModelVersionRow)
                    .where(ModelVersionRow.name == MODEL_NAME, ModelVersionRow.version != version)
                    .values(active=False)
                )

    def import_published(self, repository: ModelRepository) -> None:
        """Before the repository is rendered: versions published to the catalog while the sampler was away
        (newer than every folder) become folders with the same numbers."""
        rows = self.rows()
        latest = repository.latest()
        for version in sorted(v for v in rows if v > latest):
            try:
                repository.add_version(rows[version].uri, version=version)
                log.info("catalog version added to the repository", extra={"version": version})
            except (PonyError, OSError, ValueError) as exc:
                log.error("catalog version %s cannot be served: %s", version, exc)

    def record_repository(self, repository: ModelRepository) -> None:
        """After rendering: folders the catalog lacks become rows; the newest folder is the active row."""
        rows = self.rows()
        known = {v.version: v.source for v in repository.versions()}
        for version, uri in known.items():
            if version not in rows:
                self.record(version, uri, active=False)
        if known:
            newest = max(known)
            self.record(newest, rows[newest].uri if newest in rows else known[newest], active=True)
