"""The training loop, its optimizer and its torchrun collectives."""
