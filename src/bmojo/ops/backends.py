"""Which implementation of the sequence ops the model runs.

* ``"chunked"`` (default): chunked SSD scan, chunked attention with static shapes, sort-free selection.
  This is the form used for training on CPU and XLA.
* ``"reference"``: the sequential SSD loop, dense masked attention and the plain-loop selection policy —
  slow, for tests that check the whole model against the reference.

Select with ``BMOJO_BACKEND=reference`` or ``with use_backend("reference"): ...``. A Trainium NKI backend
registers here when its kernels import.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

BACKENDS = ("chunked", "reference")
_current = os.environ.get("BMOJO_BACKEND", "chunked")
if _current not in BACKENDS:
    raise ValueError(f"BMOJO_BACKEND={_current!r} is not one of {BACKENDS}")


def current_backend() -> str:
    return _current


@contextmanager
def use_backend(name: str):
    """Run the enclosed code with backend ``name``."""
    global _current
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    previous, _current = _current, name
    try:
        yield
    finally:
        _current = previous
