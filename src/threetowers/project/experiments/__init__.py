"""Classifier pretraining and the paper's comparison (reproduce)."""
