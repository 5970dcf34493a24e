"""The trainer: the loop, its resumable state and optimizer, run directories and checkpoints."""
