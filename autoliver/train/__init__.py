"""Training: loss, learning-rate schedules, splits, checkpoints, the training loop, validation
and torch.distributed support. ``autoliver.api.train`` is the entry point."""
