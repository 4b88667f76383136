"""The XLA tier: torch-xla on the CPU (PJRT_DEVICE=CPU), in ./.venv-xla (scripts/setup_xla.sh).

In an environment without torch-xla (the default CPU suite, torch 2.13) every module here is skipped by
``pytest.importorskip``. ``BMOJO_REQUIRE_XLA=1`` (set by scripts/test.sh) turns that skip into an error, so the
tier cannot silently vanish from CI.
"""

import os

import pytest

# Before torch_xla is imported: the CPU PJRT client, and source locations in the HLO for the op census.
os.environ.setdefault("PJRT_DEVICE", "CPU")
os.environ.setdefault("XLA_IR_DEBUG", "1")
os.environ.setdefault("XLA_HLO_DEBUG", "1")

try:
    import torch_xla

    # The autograd engine sizes its per-device queues at the first backward pass: the XLA device must exist by
    # then, or a later backward on it fails an internal assert (tests here also run backward on the CPU first).
    torch_xla.device()
except ImportError:
    pass

if os.environ.get("BMOJO_REQUIRE_XLA") == "1":
    try:
        import torch_xla  # noqa: F401
    except ImportError as err:
        raise pytest.UsageError(f"BMOJO_REQUIRE_XLA=1 but torch_xla does not import: {err}") from err


@pytest.fixture(scope="session")
def report_dir(tmp_path_factory):
    """Where the tier writes its findings (the HLO census): ``$BMOJO_XLA_REPORT_DIR`` or a temporary folder."""
    path = os.environ.get("BMOJO_XLA_REPORT_DIR")
    if path:
        os.makedirs(path, exist_ok=True)
        return path
    return str(tmp_path_factory.mktemp("xla-report"))
