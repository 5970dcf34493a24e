"""A trained run in other libraries' formats."""
