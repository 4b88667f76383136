from .chunk import bmojo_attention_chunked, bmojo_attention_step
from .naive import bmojo_attention_ref

__all__ = ["bmojo_attention_chunked", "bmojo_attention_ref", "bmojo_attention_step"]
