"""What is computed once from the data and read back: features, pixels."""
