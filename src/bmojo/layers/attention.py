"""The attention mixer: sliding-window causal attention (window ``W``; ``W >= L`` is full attention), and its
decoding state, a ring buffer of the last keys and values.

``BMojoMixer`` (``layers/bmojo.py``) extends it with fading tokens and the eidetic memory; both run through the
same B'MOJO attention op (``ops/attention``), which without the extra key sets is exactly sliding-window attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..ops import dispatch
from ..ops.attention.common import SEQUENCE_INPUTS, KeyContextBlock, key_context_blocks
from ..ops.common import cast
from ..ops.rope import apply_rope, rotate
from ..ops.selection import EideticMemory
from .common import InferenceState, MixerOutput, Rope, SequenceInfo, StepInfo, run_op, sequence_block


@dataclass
class AttentionState(InferenceState):
    """The last ``R`` keys (rotary applied) and values ``ring_k, ring_v [B, R, Hkv, D]`` and their positions
    ``ring_pos [B, R]`` (``-1``: empty); token ``t`` lives in slot ``t % R``. ``R = W``, or ``2W`` when the ring
    also keeps the fading keys and values ``ring_kf, ring_vf`` of the span that left the window (B'MOJO layers)."""

    ring_k: torch.Tensor | None = None
    ring_v: torch.Tensor | None = None
    ring_pos: torch.Tensor | None = None
    ring_kf: torch.Tensor | None = None
    ring_vf: torch.Tensor | None = None


class SlidingWindowAttention(nn.Module):
    """Mixer of ``"attention"`` layers: rotary GQA attention over the window ``[i-W+1, i]``.

    Head counts are read from the projections' weights, so a tensor-parallel shard runs the same code.
    """

    state_type = AttentionState
    # sequence ops recomputed in the backward (``run_op``; set by the model's ``selective_recompute_enable``)
    recompute_ops: frozenset[str] = frozenset()
    # Whether the layer type can carry fading keys / an eidetic memory (the config may still turn them off).
    use_fading = False
    use_eidetic = False

    def __init__(self, config, layer_idx: int = 0):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.window = config.window_size
        self.chunk_size = config.chunk_size
        d = config.hidden_size
        q, kv = config.num_attention_heads * self.head_dim, config.num_key_value_heads * self.head_dim
        bias = config.attention_bias  # query/key/value biases (Qwen2); the fading path shares them
        self.q_proj = nn.Linear(d, q, bias=bias)
        self.k_proj = nn.Linear(d, kv, bias=bias)
        self.v_proj = nn.Linear(d, kv, bias=bias)
        self.o_proj = nn.Linear(q, d, bias=False)

    @property
    def num_heads(self) -> int:
        return self.q_proj.weight.shape[0] // self.head_dim

    @property
    def num_kv(self) -> int:
        return self.k_proj.weight.shape[0] // self.head_dim

    @classmethod
    def allocate_inference_state(cls, config, batch_size: int, device=None, dtype=torch.float32) -> AttentionState:
        """An empty ring (full-size, from ``config``)."""
        fading = cls.use_fading and config.use_fading
        ring = 2 * config.window_size if fading else config.window_size
        kv = (batch_size, ring, config.num_key_value_heads, config.head_dim)
        state = AttentionState(
            ring_k=torch.zeros(kv, device=device, dtype=dtype),
            ring_v=torch.zeros(kv, device=device, dtype=dtype),
            ring_pos=torch.full((batch_size, ring), -1, dtype=torch.long, device=device),
        )
        if fading:
            state.ring_kf = torch.zeros(kv, device=device, dtype=dtype)
            state.ring_vf = torch.zeros(kv, device=device, dtype=dtype)
        return state

    # Projections ---------------------------------------------------------------------------------------------------
    def _kv(self, h):
        lead = h.shape[:-1]
        k = self.k_proj(h).view(*lead, self.num_kv, self.head_dim)
        v = self.v_proj(h).view(*lead, self.num_kv, self.head_dim)
        return k, v

    def _qkv(self, h):
        q = self.q_proj(h).view(*h.shape[:-1], self.num_heads, self.head_dim)
        return (q, *self._kv(h))

    def _attend(self, q_rot, k_rot, v, info: SequenceInfo, k_fade=None, v_fade=None, q_eid=None, memory=None,
                **options):
        """The B'MOJO attention op over the sequence -> ``[B, L, d]`` after ``o_proj``; ``options``: the op's
        keywords for the key-set biases, the self fading key and document starts (B'MOJO layers). Where the
        sequence runs in blocks (``_query_block``), one op call per block of queries, each on the pieces of the
        inputs its keys reach (``key_context_blocks``) and recomputed on its own."""
        block = self._query_block(q_rot)
        if block is None:
            out = run_op(
                self, "attention", q_rot, k_rot, v, self.window, self.chunk_size, k_fade, v_fade, q_eid, memory,
                key_mask=info.valid, **options,
            )
            return self._project_out(out)
        inputs = dict(q=q_rot, k=k_rot, v=v, k_fade=k_fade, v_fade=v_fade, q_eid=q_eid, key_mask=info.valid)
        inputs.update({name: options.pop(name) for name in SEQUENCE_INPUTS if name in options})
        context = 2 * self.window if k_fade is not None else self.window  # how far back a block's keys reach
        blocks = key_context_blocks(block, context, self.chunk_size, inputs, memory)
        outs = [run_op(self, "attention", part, call=self._attention_block, **options) for part in blocks]
        return self._project_out(torch.cat(outs, dim=1))

    def _attention_block(self, fn, part: KeyContextBlock, **options) -> torch.Tensor:
        """The attention op ``fn`` over one block of queries (``part``) -> ``[B, block, H, D]``."""
        x, memory = part.assemble()
        return fn(
            x.pop("q"), x.pop("k"), x.pop("v"), self.window, self.chunk_size, x.pop("k_fade"), x.pop("v_fade"),
            x.pop("q_eid"), memory, query_range=part.query_range, **x, **options,
        )

    def _query_block(self, q: torch.Tensor) -> int | None:
        """Queries per call of the attention op (``sequence_block``), or ``None``; never for a window covering the
        sequence (one causal SDPA call there)."""
        return None if self.window >= q.shape[1] else sequence_block(self.config, q, self.chunk_size)

    def _project_out(self, out: torch.Tensor) -> torch.Tensor:
        """The attention op's output ``[..., H, D]`` -> ``o_proj`` -> ``[..., d]``."""
        return self.o_proj(out.flatten(-2))

    def forward(self, h: torch.Tensor, info: SequenceInfo) -> MixerOutput:
        """``h [B, L, d]`` -> ``MixerOutput(out [B, L, d], None, AttentionState or None)``."""
        q, k, v = self._qkv(h)
        q_rot, k_rot = apply_rope(q, info.rope.cos, info.rope.sin), apply_rope(k, info.rope.cos, info.rope.sin)
        out = self._attend(q_rot, k_rot, v, info)
        return MixerOutput(out, None, self.ring_from_prefill(k_rot, v, info) if info.collect_state else None)

    # Decoding state ------------------------------------------------------------------------------------------------
    def ring_from_prefill(self, k, v, info: SequenceInfo, k_fade=None, v_fade=None) -> AttentionState:
        """The ring after each row's last token (``info.lengths``), from the prefill's keys and values."""
        ring = 2 * self.window if self.use_fading else self.window
        last = (info.lengths - 1)[:, None]  # [B, 1]
        slot = torch.arange(ring, device=k.device)[None, :]
        pos = last - torch.remainder(last - slot, ring)  # latest position that landed in each slot
        idx = pos.clamp_min(0)[..., None, None].expand(-1, -1, self.num_kv, self.head_dim)
        empty = (pos < 0)[..., None, None]

        def take(x):
            return None if x is None else torch.gather(x, 1, idx).masked_fill(empty, 0)

        return AttentionState(take(k), take(v), pos.masked_fill(pos < 0, -1), take(k_fade), take(v_fade))

    @staticmethod
    def _rotate(rope: Rope, *xs: torch.Tensor) -> list[torch.Tensor]:
        """One decoding step's query/key heads ``xs [B, H_n, D]`` rotated at the token's position (``rope.cos,
        rope.sin [B, 1, D/2]``), all in one rotation over their concatenated heads."""
        rotated = rotate(torch.cat(xs, dim=-2), rope.cos, rope.sin)
        return list(torch.split(rotated, [x.shape[-2] for x in xs], dim=-2))

    @staticmethod
    def _write_ring(state: AttentionState, info: StepInfo, k_rot, v, k_fade=None, v_fade=None) -> None:
        """Store the token's key and value (``[B, Hkv, D]``; and its fading ones, where given) in its ring slot."""
        ring = state.ring_pos.shape[1]
        pairs = [(state.ring_k, k_rot), (state.ring_v, v), (state.ring_kf, k_fade), (state.ring_vf, v_fade)]
        pairs = [(buffer, value) for buffer, value in pairs if value is not None]
        if info.eager_cpu:  # write the slot only (selecting the whole ring would read and write all of it)
            index = info.ring_index(ring)
            for buffer, value in pairs:
                buffer.index_put_(index, cast(value, buffer.dtype))
            state.ring_pos.index_put_(index, info.positions[:, 0])
            return
        # A static graph: select over the whole ring with the slot mask (no scatter in the graph).
        write = info.ring_slot(ring)  # [B, R], the same for every layer of the step
        cell = info.shared(("ring_cell", ring), lambda: write[..., None, None])
        for buffer, value in pairs:
            buffer.copy_(torch.where(cell, cast(value[:, None], buffer.dtype), buffer))
        state.ring_pos.copy_(torch.where(write, info.positions, state.ring_pos))

    def _attend_step(self, q_rot, positions, state: AttentionState, q_eid=None, memory: EideticMemory | None = None,
                     **options):
        out = dispatch("attention_step")(
            q_rot, positions[:, 0], state.ring_k, state.ring_v, state.ring_pos, self.window,
            state.ring_kf, state.ring_vf, q_eid, memory, **options,
        )
        return self._project_out(out)

    def step(self, h: torch.Tensor, state: AttentionState, info: StepInfo) -> torch.Tensor:
        """One token per row: ``h [B, d]`` at ``info.positions [B, 1]`` -> ``[B, d]``; updates ``state`` in place."""
        q, k, v = self._qkv(h)
        q_rot, k_rot = self._rotate(info.rope, q, k)
        self._write_ring(state, info, k_rot, v)
        return self._attend_step(q_rot, info.positions, state)
