"""The training-pod side of the trainer: what runs inside a training Job (or the local executor's subprocess).

`train.py` is the entrypoint (`python -m services.trainer.training.train`), `loop.py` the rectified-flow loop over
stages and buckets (`buckets.py`, `captions.py`, `flow.py`, `latents.py`, `ema.py`, `checkpoints.py`), `manifest.py`
reads the exported `manifest.parquet`. The controller never imports this package (an import contract says so).
"""
