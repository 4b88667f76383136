"""Eidetic selection: innovation-based top-k per chunk and a fixed-size memory (``EideticMemory``).

Forms: ``naive`` (plain loops and Python sorting), ``chunk`` (static shapes, the whole sequence at once),
``recurrent`` (one merge at a time: decoding). ``select_per_chunk`` and ``select_per_chunk_ref`` share one
signature.
"""

from ..registry import register
from .chunk import memory_per_chunk, select_per_chunk, take_selected, topk_per_chunk
from .common import INVALID_SCORE, EideticMemory, Slots, empty_slots, map_slots
from .naive import eidetic_mask_ref, select_per_chunk_ref
from .recurrent import merge_slots

register("eidetic_selection", "chunked")(select_per_chunk)
register("eidetic_selection", "reference")(select_per_chunk_ref)

__all__ = [
    "INVALID_SCORE",
    "EideticMemory",
    "Slots",
    "eidetic_mask_ref",
    "empty_slots",
    "map_slots",
    "memory_per_chunk",
    "merge_slots",
    "select_per_chunk",
    "select_per_chunk_ref",
    "take_selected",
    "topk_per_chunk",
]
