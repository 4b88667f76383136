"""A decoder block: pre-RMSNorm -> mixer -> residual -> pre-RMSNorm -> SwiGLU MLP -> residual (MLP optional)."""

from __future__ import annotations

import torch
import torch.nn as nn

from .attention import SlidingWindowAttention
from .bmojo import BMojoMixer
from .common import InferenceState, SequenceInfo, StepInfo
from .mlp import BMojoMLP
from .norm import BMojoRMSNorm
from .ssm import Mamba2Mixer

# The mixer of each layer type (config.layers_block_type); all share one call shape (layers/common.py).
MIXERS = {"ssm": Mamba2Mixer, "attention": SlidingWindowAttention, "bmojo": BMojoMixer}


class BMojoBlock(nn.Module):
    """pre-RMSNorm -> mixer -> residual -> pre-RMSNorm -> SwiGLU MLP -> residual (MLP optional).

    ``gradient_checkpointing`` / ``_gradient_checkpointing_func``: set by the model's
    ``gradient_checkpointing_enable()``; ``BMojoModel.forward`` decides when to use them (transformers' attribute
    names, so its ``is_gradient_checkpointing`` sees them)."""

    gradient_checkpointing = False

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.layer_type = config.layers_block_type[layer_idx]
        self.input_norm = BMojoRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mixer = MIXERS[self.layer_type](config, layer_idx=layer_idx)
        self.mlp = None
        if config.use_mlp:
            self.post_mixer_norm = BMojoRMSNorm(config.hidden_size, config.rms_norm_eps)
            self.mlp = BMojoMLP(config)

    def _mlp(self, x):
        return x if self.mlp is None else x + self.mlp(self.post_mixer_norm(x))

    def forward(self, x: torch.Tensor, info: SequenceInfo):
        """``x [B, L, d]`` -> ``(x [B, L, d], aux_loss or None, state or None)``."""
        out, aux, state = self.mixer(self.input_norm(x), info)
        return self._mlp(x + out), aux, state

    def step(self, x: torch.Tensor, state: InferenceState, info: StepInfo) -> torch.Tensor:
        """One token ``x [B, d]`` at ``info.positions [B, 1]`` -> ``[B, d]``; updates ``state`` in place (``info``:
        the step's positions, rotary angles, document starts and token ids, shared by every layer)."""
        return self._mlp(x + self.mixer.step(self.input_norm(x), state, info))
