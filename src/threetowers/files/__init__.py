"""Files a run reads back: written whole or not at all, one writer, damage named, tensors only."""
