"""Helpers shared by several test modules; shared fixtures live in conftest.py."""
