"""Shared test setup. ``import bmojo`` finds this checkout's src/ through pytest's ``pythonpath`` setting
(pyproject.toml); test tiers are pytest markers (``xla``, ``core``, registered there)."""
