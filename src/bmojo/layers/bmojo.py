"""The B'MOJO layer: an SSM, sliding-window attention and the eidetic memory, composed.

Source: Zancato et al., NeurIPS 2024, Sec. 3 (B'MOJO) and its released mixer (awslabs/hybrid-model-factory,
``layers/bmojo_f/``: the SSM and the attention are siblings composed by the layer).

The layer's Mamba-2 SSM (``layers/ssm.py``) reads the input and emits one *fading token* per position; one softmax
attention (``layers/attention.py``) then covers three key sets: the in-context window ``[i-W+1, i]``, the fading
tokens of the span that just left the window ``[i-2W+1, i-W]`` (projected by the same key/value weights), and the
eidetic memory (``layers/eidetic.py``) of tokens the SSM found hard to predict. Eidetic keys are scored as if they
sat exactly ``2W`` before the query, so the distances a model sees on long inputs never exceed those of training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.rope import apply_rope
from .attention import AttentionState, SlidingWindowAttention
from .common import InferenceState, MixerOutput, Rope, SequenceInfo, state_field
from .eidetic import EideticState, PartialSum, innovation_error, innovation_loss, select, selection_scores
from .ssm import Mamba2Mixer, SSMState


@dataclass
class BMojoState(InferenceState):
    """A B'MOJO layer's decoding state: its SSM's, its attention ring's (with the fading keys), its memory's."""

    ssm: SSMState | None = state_field(SSMState)
    attention: AttentionState | None = state_field(AttentionState)
    eidetic: EideticState | None = state_field(EideticState)


class BMojoMixer(SlidingWindowAttention):
    """Mixer of ``"bmojo"`` layers: sliding-window attention (the parent's projections) plus fading tokens from
    its own ``ssm`` (``use_fading``) and, with ``memory_size > 0``, the eidetic memory. Without either it computes
    exactly what ``SlidingWindowAttention`` computes (and holds the same parameters)."""

    state_type = BMojoState
    use_fading = True
    use_eidetic = True

    def __init__(self, config):
        super().__init__(config)
        self.use_fading = config.use_fading
        self.use_eidetic = config.eidetic
        self.ssm = Mamba2Mixer(config) if config.layer_has_ssm("bmojo") else None
        if self.use_eidetic:
            self.memory_size = config.memory_size
            self.selections = config.selections_per_chunk
            # Predicts token t's key from the fading token f_{t-1}; its error is the innovation score.
            self.innovation_predictor = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim)
            self.innovation_sum = PartialSum()  # the score's sum over key features; split over TP ranks
            self.key_features = config.num_key_value_heads * self.head_dim  # global: the score's denominator
            # Retention options (ops/selection/chunk.py); the defaults are decay 1, delay 0, no document reset.
            self.retention = dict(decay=config.memory_score_decay, delay=EideticState.admission_delay(config))
            self.reset_at_document = config.memory_reset_at_document

    @property
    def sum_over_shards(self):
        """The reduction bound to ``innovation_sum`` (the identity on one device)."""
        return self.innovation_sum.reduce

    @classmethod
    def allocate_inference_state(cls, config, batch_size: int, device=None, dtype=torch.float32) -> BMojoState:
        return BMojoState(
            ssm=Mamba2Mixer.allocate_inference_state(config, batch_size, device, dtype)
            if config.layer_has_ssm("bmojo")
            else None,
            attention=super().allocate_inference_state(config, batch_size, device, dtype),
            eidetic=EideticState.allocate(config, batch_size, device, dtype) if config.eidetic else None,
        )

    def _innovation(self, f_prev: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Innovation score of keys ``k [..., Hkv, D]`` given the previous fading tokens ``f_prev [..., d]``."""
        return innovation_error(self.innovation_predictor, self.innovation_sum, f_prev, k, self.key_features)

    def forward(self, h: torch.Tensor, info: SequenceInfo) -> MixerOutput:
        """``h [B, L, d]`` -> ``MixerOutput(out [B, L, d], innovation loss or None, BMojoState or None)``."""
        length = h.shape[1]
        rope = info.rope
        q, k, v = self._qkv(h)
        q_rot, k_rot = apply_rope(q, rope.cos, rope.sin), apply_rope(k, rope.cos, rope.sin)
        f = ssm_state = None
        if self.ssm is not None:  # its output is the fading tokens
            f, _, ssm_state = self.ssm(h, info)
        k_fade = v_fade = None
        if self.use_fading:
            kf, v_fade = self._kv(f)  # the fading path shares the key/value weights
            k_fade = apply_rope(kf, rope.cos, rope.sin)
        aux = q_eid = memory = eidetic = doc_start = None
        if self.use_eidetic:
            f_prev = F.pad(f, [0, 0, 1, 0])[:, :length]  # f_{t-1}; zeros before the first token
            err = self._innovation(f_prev, k)
            aux = innovation_loss(err, info.valid)
            scores = selection_scores(err, info.valid)
            doc_start = info.doc_start if self.reset_at_document else None
            retention = {**self.retention, **({} if doc_start is None else {"doc_start": doc_start})}
            picks, memory = select(scores, k, v, self.chunk_size, self.selections, self.memory_size, **retention)
            # Eidetic scores use the unrotated query against the key rotated to position -2W: a fixed distance.
            q_eid = apply_rope(q, rope.eid_cos, rope.eid_sin)
            if info.collect_state:
                delay = self.retention["delay"]
                eidetic = EideticState.from_prefill(picks, memory, f, info.lengths, self.chunk_size, delay)
        out = self._attend(q_rot, k_rot, v, info, k_fade, v_fade, q_eid, memory, doc_start=doc_start)
        state = None
        if info.collect_state:
            ring = self.ring_from_prefill(k_rot, v, info, k_fade, v_fade)
            state = BMojoState(ssm_state, ring, eidetic)
        return MixerOutput(out, aux, state)

    def step(
        self, h: torch.Tensor, state: BMojoState, positions: torch.Tensor, rope: Rope, doc_start=None
    ) -> torch.Tensor:
        """One token per row: ``h [B, d]`` at ``positions [B, 1]`` -> ``[B, d]``; updates ``state`` in place.
        ``doc_start [B]`` (long): the token's document start (``memory_reset_at_document``), else ``None``."""
        q, k, v = self._qkv(h[:, None])
        q_rot, k_rot = apply_rope(q, rope.cos, rope.sin)[:, 0], apply_rope(k, rope.cos, rope.sin)[:, 0]
        q, k, v = q[:, 0], k[:, 0], v[:, 0]
        write = self._write_ring(state.attention, positions, k_rot, v)
        f = self.ssm.step(h, state.ssm, positions, rope) if self.ssm is not None else None
        if self.use_fading:
            kf, vf = self._kv(f[:, None])
            self._put(state.attention.ring_kf, write, apply_rope(kf, rope.cos, rope.sin)[:, 0])
            self._put(state.attention.ring_vf, write, vf[:, 0])
        q_eid = memory = None
        doc_start = doc_start if self.use_eidetic and self.reset_at_document else None
        if self.use_eidetic:
            score = self._innovation(state.eidetic.prev_f, k).float()
            memory = state.eidetic.step(
                k, v, score, f, positions, self.chunk_size, self.selections, self.memory_size,
                **self.retention, doc_start=doc_start,
            )  # fmt: skip
            q_eid = apply_rope(q[:, None], rope.eid_cos, rope.eid_sin)[:, 0]
        return self._attend_step(q_rot, positions, state.attention, q_eid, memory, doc_start=doc_start)
