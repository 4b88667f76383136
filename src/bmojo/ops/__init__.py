"""Sequence ops, one folder per op with its reference (``naive``), chunked (``chunk``) and single-step
(``recurrent``) forms; ``registry`` chooses the form the model runs."""

from . import attention, conv, selection, ssd  # noqa: F401  (each registers its forms)
from .registry import _active, _check, dispatch, register, use_backend

_check(_active)  # an unknown BMOJO_BACKEND fails at import, as before

__all__ = ["dispatch", "register", "use_backend"]
