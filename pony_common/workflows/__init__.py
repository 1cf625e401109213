"""Celery workflows: each task a thin gRPC call plus an idempotent catalog write."""
