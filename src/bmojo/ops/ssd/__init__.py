"""Mamba-2 SSD (scalar decay per head): reference scan (``naive``), chunked form (``chunk``), recurrent form and
one-token step (``recurrent``). ``ssd_ref``, ``ssd_chunked`` and ``ssd_recurrent`` share one signature
``(x, dt, A, B, C, chunk_size=None, D=None, initial_state=None) -> (y, final_state)``."""

from ..registry import register, register_backend
from .chunk import ssd_chunked
from .naive import ssd_ref
from .nki_backend import nki_unavailable, ssd_nki, supports_nki
from .recurrent import ssd_recurrent, ssd_step

register("ssd", "chunked")(ssd_chunked)
register("ssd", "reference")(ssd_ref)
register("ssd", "nki", supports=supports_nki)(ssd_nki)  # every other op runs its chunked form under "nki"
register_backend("nki", nki_unavailable)
for _backend in ("chunked", "reference"):  # one token: the step is its own reference
    register("ssd_step", _backend)(ssd_step)

__all__ = ["ssd_ref", "ssd_chunked", "ssd_recurrent", "ssd_step"]
