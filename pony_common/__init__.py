"""Pony Platform: what two or more services share (config, gRPC, images, catalog, blobs, Celery, models, CLI)."""
