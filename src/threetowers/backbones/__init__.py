"""Frozen pretrained towers: the contract, the registry and the bundled backbones."""
