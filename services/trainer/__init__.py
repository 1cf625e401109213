"""Trainer: the training entrypoint (AuraFlow rectified flow) and the TrainerController service."""
