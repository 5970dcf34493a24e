"""The paper's project: the embedded procedural world and the experiments run on it."""
