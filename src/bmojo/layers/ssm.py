"""The SSM mixer: Mamba-2 (SSD) and its decoding state.

Source: Dao & Gu, "Transformers are SSMs" (2024), the Mamba-2 block; state-spaces/mamba ``modules/mamba2.py``.
In an ``"ssm"`` layer it is the mixer; in a ``"bmojo"`` layer its outputs are the fading tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import dispatch
from ..ops.common import at_least_fp32, compute_dtype
from ..ops.conv import conv_state_from_inputs
from .common import InferenceState, MixerOutput, SequenceInfo, StepInfo, run_op, sequence_block
from .norm import BMojoGatedRMSNorm


@dataclass
class SSMState(InferenceState):
    """``conv [B, conv_dim, K-1]``: the last ``K-1`` inputs of the convolution, oldest first;
    ``ssm [B, H, P, N]`` (at least float32): the recurrent state of the scan."""

    conv: torch.Tensor | None = None
    ssm: torch.Tensor | None = None


class Mamba2Mixer(nn.Module):
    """Mamba-2 mixer (SSD): input projection, causal depthwise conv, selective scan, gated RMSNorm, output
    projection. Maps ``[B, L, d] -> [B, L, d]``.

    Local sizes (heads, groups, channels) are read from the weights, so a tensor-parallel shard runs the same code.
    """

    state_type = SSMState
    # sequence ops recomputed in the backward (``run_op``; set by the model's ``selective_recompute_enable``)
    recompute_ops: frozenset[str] = frozenset()

    def __init__(self, config, layer_idx: int = 0):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx  # the block's index (every mixer takes it; the SSM does not use it)
        self.hidden_size = config.hidden_size
        self.head_dim = config.ssm_head_dim
        self.state_size = config.ssm_state_size
        self.chunk_size = getattr(config, "ssd_chunk_size", None) or config.chunk_size  # the SSD's own chunk
        self.conv_kernel = config.ssm_conv_kernel
        inner, heads, groups = config.ssm_inner_size, config.ssm_num_heads, config.ssm_ngroups
        conv_dim = inner + 2 * groups * self.state_size
        self.in_proj = nn.Linear(self.hidden_size, inner + conv_dim + heads, bias=False)
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, self.conv_kernel, groups=conv_dim, bias=True)
        self.dt_bias = nn.Parameter(torch.zeros(heads))
        self.A_log = nn.Parameter(torch.zeros(heads))
        self.D = nn.Parameter(torch.ones(heads))
        self.norm = BMojoGatedRMSNorm(inner, groups, config.rms_norm_eps)
        self.out_proj = nn.Linear(inner, self.hidden_size, bias=False)

    # Local sizes, from the weights --------------------------------------------------------------------------------
    @property
    def heads(self) -> int:
        return self.A_log.shape[0]

    @property
    def inner(self) -> int:
        return self.heads * self.head_dim

    @property
    def conv_dim(self) -> int:
        return self.conv1d.weight.shape[0]

    @property
    def groups(self) -> int:
        return (self.conv_dim - self.inner) // (2 * self.state_size)

    @classmethod
    def allocate_inference_state(cls, config, batch_size: int, device=None, dtype=torch.float32) -> SSMState:
        """The state before the first token (zeros), full-size (unsharded) from ``config``."""
        conv_dim = config.ssm_inner_size + 2 * config.ssm_ngroups * config.ssm_state_size
        shape = (batch_size, config.ssm_num_heads, config.ssm_head_dim, config.ssm_state_size)
        return SSMState(
            conv=torch.zeros(batch_size, conv_dim, config.ssm_conv_kernel - 1, device=device, dtype=dtype),
            ssm=torch.zeros(shape, device=device, dtype=compute_dtype(dtype)),
        )

    def _split(self, zxbcdt):
        return torch.split(zxbcdt, [self.inner, self.conv_dim, self.heads], dim=-1)

    def _heads(self, xbc):
        bc = self.groups * self.state_size
        x, b, c = torch.split(xbc, [self.inner, bc, bc], dim=-1)
        lead = x.shape[:-1]
        return (
            x.reshape(*lead, self.heads, self.head_dim),
            b.reshape(*lead, self.groups, self.state_size),
            c.reshape(*lead, self.groups, self.state_size),
        )

    def _decay(self) -> torch.Tensor:
        return -torch.exp(at_least_fp32(self.A_log))

    def forward(self, h: torch.Tensor, info: SequenceInfo) -> MixerOutput:
        """``h [B, L, d]`` -> ``MixerOutput(out [B, L, d], None, SSMState or None)``."""
        z, xbc, dt = self._split(self.in_proj(h))
        valid = info.valid[..., None] if info.valid is not None else None
        if valid is not None:  # padding must leave the state untouched: zero inputs, zero step size
            xbc = xbc * valid
        conv_in = xbc
        xbc = F.silu(dispatch("causal_conv1d")(xbc, self.conv1d.weight[:, 0, :], self.conv1d.bias))
        dt = F.softplus(at_least_fp32(dt) + at_least_fp32(self.dt_bias))
        if valid is not None:
            xbc = xbc * valid
            dt = dt * valid
        x, b, c = self._heads(xbc)
        y, final = self._scan(x, dt, b, c)
        y = self.norm(y.reshape(*h.shape[:-1], self.inner), z)
        state = None
        if info.collect_state:
            state = SSMState(conv=conv_state_from_inputs(conv_in, info.lengths, self.conv_kernel), ssm=final)
        return MixerOutput(self.out_proj(y), None, state)

    def _scan(self, x, dt, b, c):
        """The SSD op over the sequence -> ``(y [B, L, H, P], final state)``; in blocks of ``sequence_block`` tokens
        where set, each block starting from the state the previous one ended with (each its own ``run_op`` call, so
        recomputed on its own)."""
        block = sequence_block(self.config, x, self.chunk_size)
        if block is None:
            return run_op(self, "ssd", x, dt, self._decay(), b, c, self.chunk_size, D=self.D)
        ys, state = [], None
        # torch.split, not indexing: one backward (a concatenation) for all blocks, not a zero-filled full-length
        # gradient per block
        for xs, dts, bs, cs in zip(*(t.split(block, dim=1) for t in (x, dt, b, c))):
            y, state = run_op(
                self, "ssd", xs, dts, self._decay(), bs, cs, self.chunk_size, D=self.D, initial_state=state
            )
            ys.append(y)
        return torch.cat(ys, dim=1), state

    def step(self, h: torch.Tensor, state: SSMState, info: StepInfo | None = None) -> torch.Tensor:
        """One token ``h [B, d]`` -> ``[B, d]``; updates ``state`` in place (``info`` unused: the recurrence carries
        the order)."""
        z, xbc, dt = self._split(self.in_proj(h))
        xbc, conv = dispatch("causal_conv1d_step")(state.conv, xbc, self.conv1d.weight[:, 0, :], self.conv1d.bias)
        state.conv.copy_(conv)
        x, b, c = self._heads(F.silu(xbc))
        dt = F.softplus(at_least_fp32(dt) + at_least_fp32(self.dt_bias))
        y, ssm = dispatch("ssd_step")(state.ssm, x, dt, self._decay(), b, c, D=self.D)
        state.ssm.copy_(ssm)
        return self.out_proj(self.norm(y.reshape(h.shape[0], self.inner), z))
