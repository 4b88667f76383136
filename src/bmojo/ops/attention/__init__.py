"""B'MOJO attention (in-context window + fading tokens + eidetic memory under one softmax).

Forms: ``naive`` (dense masked reference), ``chunk`` (static-shape chunks), ``recurrent`` (one decoding step over
a ring buffer). The reference and chunked forms share one signature ``(q, k, v, window, chunk_size, k_fade,
v_fade, q_eid, memory: EideticMemory, key_mask, scale)``; the step form takes the same ``EideticMemory`` type.
"""

from ..registry import register
from .chunk import bmojo_attention_chunked
from .naive import bmojo_attention_ref
from .nki_backend import bmojo_attention_nki, supports_attention_nki
from .recurrent import bmojo_attention_step

register("attention", "chunked")(bmojo_attention_chunked)
register("attention", "reference")(bmojo_attention_ref)
register("attention", "nki", supports=supports_attention_nki)(bmojo_attention_nki)
for _backend in ("chunked", "reference"):  # one query: the step is its own reference
    register("attention_step", _backend)(bmojo_attention_step)

__all__ = ["bmojo_attention_chunked", "bmojo_attention_ref", "bmojo_attention_step"]
