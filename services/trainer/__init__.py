"""Trainer: the TrainerController service (controller pod) and the training entrypoint (training pods).

Controller pod: `app.py` (wiring), `servicer.py` (transport), `service.py` (`TrainerService`: runs, executors,
publish), `store.py` (its tables: training_runs, run_events), `client.py` (`TrainerClient`), `cli.py` (ponyctl
train), `executors/`, `render.py`, `publish.py`, `local_run.py`. Both sides: `spec.py`, `events.py`.
Training pods: `training/` (entrypoint `python -m services.trainer.training.train`), never imported by the controller.
"""
