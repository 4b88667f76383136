"""The one place that chooses which implementation of a sequence op runs (in the style of
flash-linear-attention's dispatch): a table ``(op, backend) -> function``.

Backends:

* ``"chunked"`` (default, complete): chunked SSD scan, chunked attention with static shapes, sort-free
  selection; the form used for training on CPU and XLA.
* ``"reference"``: the sequential SSD loop, dense masked attention and the plain-loop selection policy; slow,
  for the tests that check the whole model against the references.

* ``"nki"``: Beta-1 NKI kernels for trn1 (``ops/ssd/nki.py``; docs/kernels.md), for the ops that have one.

A backend registers its functions here with ``register(op, name, supports=...)``; ``supports(*args, **kwargs)``
is a cheap per-call check (dtype, device, shape limits) returning True, or False or a one-line reason to refuse.
Where the active backend has no implementation of an op, or its check says no, the call runs the ``"chunked"``
form and the fallback (with the reason) is logged once per (op, backend). Every form of an op takes the same
arguments. ``register_backend(name, unavailable)`` adds a whole-backend check (``unavailable()`` -> None or why
not): choosing such a backend where it cannot run at all raises ``BackendUnavailable``, one line.

Select with ``BMOJO_BACKEND=reference`` or ``with use_backend("reference"): ...``. Model code calls
``dispatch(op)`` and never asks which backend is active.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from contextlib import contextmanager

from ..errors import BMojoError

logger = logging.getLogger(__name__)

DEFAULT_BACKEND = "chunked"

# (op, backend) -> (function, supports or None)
_TABLE: dict[tuple[str, str], tuple[Callable, Callable[..., bool] | None]] = {}
_active = os.environ.get("BMOJO_BACKEND", DEFAULT_BACKEND)
_warned: set[tuple[str, str]] = set()
_UNAVAILABLE: dict[str, Callable[[], str | None]] = {}


class BackendUnavailable(BMojoError):
    """The chosen backend cannot run in this environment at all (the message says why, in one line)."""


def register_backend(name: str, unavailable: Callable[[], str | None]) -> None:
    """``unavailable()`` says why backend ``name`` cannot run here (None where it can); checked when chosen."""
    _UNAVAILABLE[name] = unavailable


def _ensure_available(name: str) -> None:
    why = _UNAVAILABLE[name]() if name in _UNAVAILABLE else None
    if why:
        raise BackendUnavailable(f"backend {name!r} cannot run here: {why}; choose one of {backends()}")


def register(op: str, backend: str, supports: Callable[..., bool] | None = None):
    """Decorator: ``fn`` implements ``op`` on ``backend`` (for inputs where ``supports`` is true, if given)."""

    def add(fn: Callable) -> Callable:
        _TABLE[(op, backend)] = (fn, supports)
        return fn

    return add


def backends() -> tuple[str, ...]:
    """Names of the registered backends, default first."""
    names = {backend for _, backend in _TABLE} | {DEFAULT_BACKEND}
    return (DEFAULT_BACKEND, *sorted(names - {DEFAULT_BACKEND}))


def _check(name: str) -> None:
    if name not in backends():
        raise ValueError(f"unknown backend {name!r}; choose one of {backends()}")


def dispatch(op: str) -> Callable:
    """The function that runs ``op`` on the active backend; call it with the op's arguments.

    Raises ``BackendUnavailable`` where the active backend (e.g. ``BMOJO_BACKEND=nki``) cannot run here at all."""
    _ensure_available(_active)
    entry = _TABLE.get((op, _active))
    if entry is None:
        _fallback(op, "has no implementation")
        return _TABLE[(op, DEFAULT_BACKEND)][0]
    fn, supports = entry
    if supports is None:
        return fn

    def checked(*args, **kwargs):
        verdict = supports(*args, **kwargs)
        if verdict is True:
            return fn(*args, **kwargs)
        _fallback(op, f"does not support these inputs ({verdict})" if isinstance(verdict, str) else
                  "does not support these inputs")
        return _TABLE[(op, DEFAULT_BACKEND)][0](*args, **kwargs)

    return checked


def _fallback(op: str, why: str) -> None:
    if (op, _active) not in _warned:
        _warned.add((op, _active))
        logger.warning("backend %r %s for op %r; running the %r form", _active, why, op, DEFAULT_BACKEND)


@contextmanager
def use_backend(name: str):
    """Run the enclosed code with backend ``name`` (``ValueError`` for a name nothing registered,
    ``BackendUnavailable`` for one that cannot run here)."""
    global _active
    _check(name)
    _ensure_available(name)
    previous, _active = _active, name
    try:
        yield
    finally:
        _active = previous
