"""The curation worker tier (a Celery deployable): ingest sources, the workflow through the model services,
near-duplicates, mix selection, the training export and the HTML report; its `ponyctl` verbs in `cli.py`."""
