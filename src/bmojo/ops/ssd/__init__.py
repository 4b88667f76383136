"""Mamba-2 SSD (scalar decay per head): reference scan, chunked form, one-token step."""

from .chunk import ssd_chunked
from .naive import ssd_ref
from .recurrent import ssd_step

__all__ = ["ssd_ref", "ssd_chunked", "ssd_step"]
