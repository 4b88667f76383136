"""The layers of a B'MOJO model, one module each:

* ``ssm``: the SSM mixer (Mamba-2) and ``SSMState``;
* ``attention``: the attention mixer (sliding-window attention) and ``AttentionState`` (the ring buffer);
* ``eidetic``: the eidetic memory (innovation score, selection, retention) and ``EideticState``;
* ``bmojo``: the B'MOJO layer composing the three, and ``BMojoState``;
* ``block``: norm -> mixer -> residual -> MLP; ``MIXERS`` maps a layer type to its mixer;
* ``common``: the call shape every mixer shares (``SequenceInfo``, ``StepInfo``, ``MixerOutput``, ``Rope``,
  ``InferenceState``);
* ``norm``, ``mlp``: RMSNorms and the SwiGLU MLP.
"""

from .attention import AttentionState, SlidingWindowAttention
from .block import MIXERS, BMojoBlock
from .bmojo import BMojoMixer, BMojoState
from .common import InferenceState, MixerOutput, Rope, SequenceInfo, StepInfo
from .eidetic import EideticState, PartialSum, SumGradientOverShards
from .mlp import BMojoMLP
from .norm import BMojoGatedRMSNorm, BMojoRMSNorm
from .ssm import Mamba2Mixer, SSMState

__all__ = [
    "MIXERS",
    "AttentionState",
    "BMojoBlock",
    "BMojoGatedRMSNorm",
    "BMojoMLP",
    "BMojoMixer",
    "BMojoRMSNorm",
    "BMojoState",
    "EideticState",
    "InferenceState",
    "Mamba2Mixer",
    "MixerOutput",
    "PartialSum",
    "Rope",
    "SSMState",
    "SequenceInfo",
    "SlidingWindowAttention",
    "StepInfo",
    "SumGradientOverShards",
]
