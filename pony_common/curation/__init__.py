"""Dataset curation: ingest sources, near-duplicate grouping, mix selection, training export and the HTML report."""
