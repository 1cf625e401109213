"""The catalog: one row per image (content-hash id) and every value produced about it, with provenance."""

from pony_common.catalog.db import Catalog, catalog_for, downgrade, upgrade, upsert

__all__ = ["Catalog", "catalog_for", "downgrade", "upgrade", "upsert"]
