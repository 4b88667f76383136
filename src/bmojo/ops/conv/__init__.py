"""Causal depthwise 1-D convolution (the short conv in front of Mamba's SSM): reference loop (``naive``), whole
sequence (``chunk``), one decoding step (``recurrent``)."""

from ..registry import register
from .chunk import causal_conv1d, conv_state_from_inputs
from .naive import causal_conv1d_ref
from .recurrent import causal_conv1d_step

# The reference backend runs the same F.conv1d form: it is exact, and tests/test_conv.py checks it against the loop.
for _backend in ("chunked", "reference"):
    register("causal_conv1d", _backend)(causal_conv1d)
    register("causal_conv1d_step", _backend)(causal_conv1d_step)

__all__ = ["causal_conv1d", "causal_conv1d_ref", "causal_conv1d_step", "conv_state_from_inputs"]
