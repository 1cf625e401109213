"""Style-adherence evaluation of model versions (issue 19): grid, judges, locking figures, storage and the
promotion gate; run by the trainer controller's deployable."""
