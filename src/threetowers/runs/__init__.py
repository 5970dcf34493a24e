"""Run directories, checkpoints and loading a finished run."""
