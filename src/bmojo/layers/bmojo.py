"""The B'MOJO layer: an SSM, sliding-window attention and the eidetic memory, composed.

Source: Zancato et al., NeurIPS 2024, Sec. 3 (B'MOJO) and its released mixer (awslabs/hybrid-model-factory,
``layers/bmojo_f/``: the SSM and the attention are siblings composed by the layer).

The layer's Mamba-2 SSM (``layers/ssm.py``) reads the input and emits one *fading token* per position; one softmax
attention (``layers/attention.py``) then covers three key sets: the in-context window ``[i-W+1, i]``, the fading
tokens of the span that just left the window ``[i-2W+1, i-W]`` (projected by the same key/value weights), and the
eidetic memory (``layers/eidetic.py``) of tokens the SSM found hard to predict. Eidetic keys are scored at distance
0 (``eidetic_key_distance="zero"``, the default: unrotated query against unrotated key, a pure content match) or, in
the original design ("window"), as if they sat exactly ``2W`` before the query; either way the distances a model
sees on long inputs never exceed those of training. With ``fading_self_key`` (default) query ``i`` also attends its
own fading token ``f_i`` (distance 0).

With ``key_set_bias`` each key set but the window gets a learned logit bias per query head (``fading_bias``,
``self_fading_bias``, ``eidetic_bias``); at ``SWA_EQUIVALENT_KEY_SET_BIAS`` the layer computes sliding-window
attention with the same projections (to float32 rounding), the function-preserving start of ``bmojo convert``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.rope import apply_rope, rotate
from .attention import AttentionState, SlidingWindowAttention
from .common import InferenceState, MixerOutput, Rope, SequenceInfo, StepInfo, state_field
from .eidetic import (
    EideticState,
    PartialSum,
    SelectionBias,
    SumGradientOverShards,
    innovation_error,
    innovation_loss,
    next_input_error,
    random_score,
    recency_score,
    select,
    selection_bias_logit,
    selection_scores,
)
from .ssm import Mamba2Mixer, SSMState

# key_set_bias_init at which a B'MOJO layer equals sliding-window attention with the same q/k/v/o weights (to float32
# rounding): every fading / eidetic logit is lowered by 30, so their joint weight is at most N * exp(gap - 30) for N
# such keys whose scores exceed the window's best by at most ``gap`` (e.g. 4096 keys, gap 10: 8e-6; at -20 the same
# keys would weigh 0.2). Exact in bfloat16 (-30 = -1.875 * 2^4), and far above the dtype minimum that marks masked
# entries. The price: these biases' gradients are proportional to that weight (~1e-13 per key), below AdamW's eps,
# so a run that should open the memories has to raise the biases itself rather than wait for the gradient.
SWA_EQUIVALENT_KEY_SET_BIAS = -30.0


@dataclass
class BMojoState(InferenceState):
    """A B'MOJO layer's decoding state: its SSM's, its attention ring's (with the fading keys), its memory's."""

    ssm: SSMState | None = state_field(SSMState)
    attention: AttentionState | None = state_field(AttentionState)
    eidetic: EideticState | None = state_field(EideticState)


class BMojoMixer(SlidingWindowAttention):
    """Mixer of ``"bmojo"`` layers: sliding-window attention (the parent's projections) plus fading tokens from
    its own ``ssm`` (``use_fading``) and, with ``memory_size > 0``, the eidetic memory. Without either it computes
    exactly what ``SlidingWindowAttention`` computes (and holds the same parameters).

    What ranks tokens for the memory (``selection_score``): ``"key_prediction"`` (``innovation_predictor``, sharded
    by key heads under tensor parallelism), ``"next_input"`` (``input_predictor``, ``d -> d``, replicated), or the
    baselines ``"random"`` and ``"recency"``, which hold no predictor and give no auxiliary loss (their layers have
    ``d * Hkv * D + Hkv * D`` parameters fewer than ``"key_prediction"``'s). ``learned_selection`` adds
    ``selection_bias``; ``memory_per_kv_head`` runs selection, memory and attention with the key/value heads folded
    into the batch (row ``b * Hkv + a`` is head ``a`` of row ``b``), so each head keeps its own memory."""

    state_type = BMojoState
    use_fading = True
    use_eidetic = True

    def __init__(self, config, layer_idx: int = 0):
        super().__init__(config, layer_idx)
        self.use_fading = config.use_fading
        self.use_eidetic = config.eidetic
        self.fading_self_key = config.fading_self_key
        self.eidetic_key_distance = config.eidetic_key_distance
        self.per_head = self.use_eidetic and config.memory_per_kv_head
        self.ssm = Mamba2Mixer(config) if config.layer_has_ssm("bmojo") else None
        if self.use_eidetic:
            self.memory_size = config.memory_size
            self.selections = config.selections_per_chunk
            self.selection_score = config.selection_score
            if self.selection_score == "key_prediction":
                # Predicts token t's key from the fading token f_{t-1}; its error is the innovation score.
                self.innovation_predictor = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim)
                self.innovation_sum = PartialSum()  # the score's sum over key features; split over TP ranks
                self.key_features = config.num_key_value_heads * self.head_dim  # global: the score's denominator
            elif self.selection_score == "next_input":
                # Predicts the layer input h_t from f_{t-1} (the paper's innovation test).
                self.input_predictor = nn.Linear(config.hidden_size, config.hidden_size)
            if config.learned_selection:
                self.selection_bias = SelectionBias(config.hidden_size)
                # u is replicated but each TP rank's heads read it: its gradient is summed over the ranks.
                self.selection_bias_gradient_sum = SumGradientOverShards()
            # Retention options (ops/selection/chunk.py); the defaults are decay 1, delay 0, no document reset.
            self.retention = dict(decay=config.memory_score_decay, delay=EideticState.admission_delay(config))
            self.reset_at_document = config.memory_reset_at_document
        if config.key_set_bias:  # one logit bias per query head and key set that exists; sharded with the heads
            sets = {"fading_bias": self.use_fading, "self_fading_bias": config.fading_self_key,
                    "eidetic_bias": self.use_eidetic}
            for name in (n for n, present in sets.items() if present):
                self.register_parameter(name, nn.Parameter(self.initial_key_set_bias(config)))

    @staticmethod
    def initial_key_set_bias(config) -> torch.Tensor:
        """``[num_attention_heads]`` filled with ``key_set_bias_init`` (float32)."""
        return torch.full((config.num_attention_heads,), float(config.key_set_bias_init))

    def _eidetic_query(self, q: torch.Tensor, rope: Rope) -> torch.Tensor:
        """The query ``q [B, L, H, D]`` (unrotated) that scores the unrotated eidetic keys: rotated by ``2W``
        (``eidetic_key_distance="window"``: every slot sits exactly ``2W`` before the query), or as it is
        (``"zero"``: distance 0, a pure content match)."""
        return q if self.eidetic_key_distance == "zero" else apply_rope(q, rope.eid_cos, rope.eid_sin)

    def _key_set_biases(self) -> dict[str, torch.Tensor]:
        """The attention op's bias keywords for the biases this layer holds (none without ``key_set_bias``)."""
        names = {"fading_bias": "fading_bias", "self_bias": "self_fading_bias", "eidetic_bias": "eidetic_bias"}
        return {kw: getattr(self, name) for kw, name in names.items() if hasattr(self, name)}

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

    def _scores(self, h, f_prev, k, positions, token_ids=None) -> tuple[torch.Tensor | None, torch.Tensor]:
        """What selection ranks by, before padding and ``learned_selection``: ``(err, score)`` for tokens ``h [...,
        d]`` with keys ``k [..., Hkv, D]``, previous fading tokens ``f_prev [..., d]``, ``positions`` and (for
        ``"random"``) ``token_ids`` (long, each broadcastable to ``[...]``). ``err [...]``: the auxiliary loss's
        terms (``None`` without a predictor); ``score``: ``[...]``, per head ``[..., Hkv]`` (the key-prediction
        error of each head's own features; the other kinds give every head the token's score)."""
        lead = k.shape[:-2]
        if self.selection_score == "key_prediction":
            if self.per_head:
                return innovation_error(
                    self.innovation_predictor, self.innovation_sum, f_prev, k, self.key_features, per_head=True
                )
            err = self._innovation(f_prev, k)
            return err, err
        if self.selection_score == "next_input":
            err = score = next_input_error(self.input_predictor, f_prev, h)
        elif self.selection_score == "random":
            err, score = None, random_score(self.layer_idx, positions, token_ids).expand(lead)
        else:  # "recency"
            err, score = None, recency_score(positions).expand(lead)
        return err, score[..., None].expand(*lead, self.num_kv) if self.per_head else score

    def _ranking(self, h, score, valid) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(ranking scores, u)``: ``selection_scores`` of ``score`` with ``learned_selection``'s ``u [...]`` (the
        logit bias of ``h [..., d]``; ``None`` without it)."""
        u = None
        if hasattr(self, "selection_bias"):
            u = self.selection_bias_gradient_sum(selection_bias_logit(self.selection_bias, h))
        per_token = None if u is None else (u[..., None] if self.per_head else u)
        return selection_scores(score, valid, per_token), u

    def _fold(self, *xs):
        """``_fold_heads`` of each of ``xs`` (``None`` stays ``None``)."""
        return [None if x is None else _fold_heads(x, self.num_kv) for x in xs]

    def _fold_options(self, options: dict) -> dict:
        """The attention keywords for head-folded rows (``memory_per_kv_head``): the self fading key ``[B, ..., Hkv,
        D]`` folded like the keys, ``doc_start`` repeated per head. The ``[H]`` key-set biases would need a bias per
        folded row; the config refuses ``key_set_bias`` with ``memory_per_kv_head``."""
        self_keys = ("k_self", "v_self")
        folded = {name: _fold_heads(t, self.num_kv) if name in self_keys else t for name, t in options.items()}
        if "doc_start" in folded:
            folded["doc_start"] = folded["doc_start"].repeat_interleave(self.num_kv, 0)
        return folded

    def _project_out(self, out: torch.Tensor) -> torch.Tensor:
        return super()._project_out(_unfold_heads(out, self.num_kv) if self.per_head else out)

    # Long on purpose: the layer's parallel forward in order (SSM, fading keys, scores, selection, attention, state).
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
        options = self._key_set_biases()
        if self.use_fading or self.fading_self_key:
            kf, vf = self._kv(f)  # the fading path shares the key/value weights
            kf = apply_rope(kf, rope.cos, rope.sin)
            if self.use_fading:
                k_fade, v_fade = kf, vf
            if self.fading_self_key:  # query i's own fading token f_i, rotated at i: distance 0
                options.update(k_self=kf, v_self=vf)
        aux = q_eid = memory = eidetic = doc_start = None
        if self.use_eidetic:
            f_prev = F.pad(f, [0, 0, 1, 0])[:, :length]  # f_{t-1}; zeros before the first token
            err, score = self._scores(h, f_prev, k, info.positions, info.token_ids)
            aux = None if err is None else innovation_loss(err, info.valid)
            scores, u = self._ranking(h, score, info.valid)
            doc_start = info.doc_start if self.reset_at_document else None
            k_sel, v_sel, sel_start = k, v, doc_start
            if self.per_head:  # [B, L, Hkv] scores, [B, L, Hkv, D] keys -> rows of one head each
                scores, (k_sel, v_sel) = scores.movedim(-1, 1).flatten(0, 1), self._fold(k, v)
                u = None if u is None else u.repeat_interleave(self.num_kv, 0)
                sel_start = None if doc_start is None else doc_start.repeat_interleave(self.num_kv, 0)
            retention = {**self.retention, **({} if sel_start is None else {"doc_start": sel_start})}
            picks, memory = select(
                scores, k_sel, v_sel, self.chunk_size, self.selections, self.memory_size, bias=u, **retention
            )
            q_eid = self._eidetic_query(q, rope)
            if info.collect_state:
                delay, heads = self.retention["delay"], self.num_kv if self.per_head else None
                eidetic = EideticState.from_prefill(picks, memory, f, info.lengths, self.chunk_size, delay, heads)
        if doc_start is not None:
            options["doc_start"] = doc_start
        state = None
        if info.collect_state:
            ring = self.ring_from_prefill(k_rot, v, info, k_fade, v_fade)
            state = BMojoState(ssm_state, ring, eidetic)
        if self.per_head:
            fold = self._fold(q_rot, k_rot, v, k_fade, v_fade, q_eid)
            folded = self._fold_options(options)
            out = self._attend(*fold[:3], _fold_info(info, self.num_kv), *fold[3:], memory, **folded)
        else:
            out = self._attend(q_rot, k_rot, v, info, k_fade, v_fade, q_eid, memory, **options)
        return MixerOutput(out, aux, state)

    # Long on purpose: one decoding step in order (projections, SSM, rotation, ring, memory, attention).
    def step(self, h: torch.Tensor, state: BMojoState, info: StepInfo) -> torch.Tensor:
        """One token per row: ``h [B, d]`` at ``info.positions [B, 1]`` -> ``[B, d]``; updates ``state`` in place
        (``info.doc_start``: with ``memory_reset_at_document``; ``info.token_ids``: for ``selection_score="random"``).
        """
        positions = info.positions
        q, k, v = self._qkv(h)
        f = self.ssm.step(h, state.ssm) if self.ssm is not None else None
        options = self._key_set_biases()
        kf = vf = None
        if self.use_fading or self.fading_self_key:
            kf, vf = self._kv(f)  # the fading path shares the key/value weights
            q_rot, k_rot, kf = self._rotate(info.rope, q, k, kf)
            if self.fading_self_key:  # the token's own fading token, rotated at its position: distance 0
                options.update(k_self=kf, v_self=vf)
        else:
            q_rot, k_rot = self._rotate(info.rope, q, k)
        self._write_ring(state.attention, info, k_rot, v, *((kf, vf) if self.use_fading else ()))
        q_eid = memory = None
        doc_start = info.doc_start if self.use_eidetic and self.reset_at_document else None
        if self.use_eidetic:
            flat = info.shared("positions [B]", lambda: positions[:, 0])
            _, score = self._scores(h, state.eidetic.prev_f, k, flat, info.token_ids)
            score, u = self._ranking(h, score, None)
            memory = state.eidetic.step(
                k, v, score, f, positions, self.chunk_size, self.selections, self.memory_size,
                bias=u, **self.retention, doc_start=doc_start, boundary=info.chunk_start(self.chunk_size),
                any_boundary=info.any_chunk_start(self.chunk_size),
            )  # fmt: skip
            q_eid = q if self.eidetic_key_distance == "zero" else rotate(q, info.rope.eid_cos, info.rope.eid_sin)
        if doc_start is not None:
            options["doc_start"] = doc_start
        if self.per_head:
            ring = AttentionState(
                *(None if t is None else _fold_ring(t, self.num_kv) for t in _fields(state.attention))
            )
            q_rot, q_eid = self._fold(q_rot, q_eid)
            folded = self._fold_options(options)
            return self._attend_step(q_rot, positions.repeat_interleave(self.num_kv, 0), ring, q_eid, memory, **folded)
        return self._attend_step(q_rot, positions, state.attention, q_eid, memory, **options)


# Head folding (memory_per_kv_head): key/value head ``a`` of row ``b`` becomes row ``b * Hkv + a``, with the
# ``G = H / Hkv`` query heads that read it; the attention op then sees one memory per row.
def _fold_heads(x: torch.Tensor, num_kv: int) -> torch.Tensor:
    """``[B, ..., Hkv * G, D]`` -> ``[B * Hkv, ..., G, D]``."""
    return x.unflatten(-2, (num_kv, -1)).movedim(-3, 1).flatten(0, 1)


def _unfold_heads(x: torch.Tensor, num_kv: int) -> torch.Tensor:
    """``[B * Hkv, ..., G, D]`` -> ``[B, ..., Hkv * G, D]`` (the inverse of ``_fold_heads``)."""
    return x.unflatten(0, (-1, num_kv)).movedim(1, -3).flatten(-3, -2)


def _fold_info(info: SequenceInfo, num_kv: int) -> SequenceInfo:
    """``info`` with every per-row tensor (``[B, ...]``) repeated for each key/value head."""
    rows = {
        f.name: getattr(info, f.name).repeat_interleave(num_kv, 0)
        for f in dataclasses.fields(info)
        if f.name in ("valid", "lengths", "doc_start", "token_ids") and getattr(info, f.name) is not None
    }
    return dataclasses.replace(info, **rows)


def _fold_ring(t: torch.Tensor, num_kv: int) -> torch.Tensor:
    """A ring buffer field for head-folded rows: keys/values ``[B, R, Hkv, D]`` are folded, positions repeated."""
    return _fold_heads(t, num_kv) if t.dim() == 4 else t.repeat_interleave(num_kv, 0)


def _fields(state) -> list:
    return [getattr(state, f.name) for f in dataclasses.fields(state)]
