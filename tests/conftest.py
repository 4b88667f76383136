"""Shared test setup. ``import bmojo`` finds this checkout's src/ through pytest's ``pythonpath`` setting
(pyproject.toml); test tiers are pytest markers (``xla``, ``core``, registered there)."""

import importlib.util
import os

import pytest


def pytest_collection_modifyitems(config, items):
    """``xla``-marked tests skip where torch_xla is not installed (a plain ``pytest`` in the CPU environment);
    with ``BMOJO_REQUIRE_XLA=1`` (scripts/test.sh's XLA tier) that is an error instead, so the tier cannot vanish."""
    if importlib.util.find_spec("torch_xla") is not None:
        return
    marked = [item for item in items if item.get_closest_marker("xla")]
    if marked and os.environ.get("BMOJO_REQUIRE_XLA") == "1":
        raise pytest.UsageError(
            f"BMOJO_REQUIRE_XLA=1 but torch_xla is not installed (needed by {len(marked)} xla-marked tests)"
        )
    for item in marked:
        item.add_marker(pytest.mark.skip(reason="needs torch-xla (the XLA tier: scripts/setup_xla.sh, docs/xla.md)"))
