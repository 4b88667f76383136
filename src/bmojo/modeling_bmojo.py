"""B'MOJO models: cache -> SSM mixer -> B'MOJO attention mixer -> block -> pretrained -> model -> causal LM.

One B'MOJO layer (``layer_type="bmojo"``) runs a Mamba-2 SSM over its input to produce one *fading token* per
position, then a single softmax attention over three key sets: the in-context window ``[i-W+1, i]``, the fading
tokens of the span that just left the window ``[i-2W+1, i-W]``, and an eidetic memory of tokens that the
SSM found hard to predict (the innovation test). ``"attention"`` and ``"ssm"`` layers are the two halves alone.

Positions. In-context and fading keys carry rotary embeddings at their true positions; their distances to the
query stay below ``2W``. Eidetic keys are scored as if they sat exactly ``2W`` positions before the query, so
the distances a model sees on long inputs never exceed those it saw in training.

Padding. A left-padded batch is rolled so that every row starts at index 0 and padding trails; each row then
computes exactly what it would alone (chunk boundaries, and with them eidetic selection, align with the row's own
positions). Outputs are rolled back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.generation import utils as _generation_utils
from transformers.utils import ModelOutput

from .configuration_bmojo import BMojoConfig
from .ops.attention import bmojo_attention_chunked, bmojo_attention_ref, bmojo_attention_step
from .ops.backends import current_backend
from .ops.conv import causal_conv1d, causal_conv1d_step, conv_state_from_inputs
from .ops.rope import apply_rope, rope_cos_sin
from .ops.selection import (
    INVALID_SCORE,
    Slots,
    eidetic_mask_ref,
    empty_slots,
    memory_per_chunk,
    merge_slots,
    take_selected,
    topk_per_chunk,
)
from .ops.ssd import ssd_chunked, ssd_ref, ssd_step


# ---------------------------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------------------------
# The keyword under which `generate()` carries a model's cache between steps. transformers 5.2x renamed every cache
# keyword to ``cache`` (``cache_params`` and ``past_key_values`` became deprecated aliases, and model outputs answer
# ``.cache_params`` from a field called ``cache``); 4.5x, the trn1 line, reorders only ``past_key_values`` in beam
# search. Read from the installed transformers so that both lines decode from the fixed-size cache.
CACHE_KWARG = "cache" if "cache" in getattr(_generation_utils, "ALL_CACHE_NAMES", ()) else "past_key_values"
CACHE_ALIASES = ("cache", "cache_params", "past_key_values")


def pop_cache_argument(cache, kwargs: dict):
    """The cache given under any of its names (``cache``, ``cache_params``, ``past_key_values``); one at most."""
    given = {"cache": cache} if cache is not None else {}
    for name in CACHE_ALIASES[1:]:
        value = kwargs.pop(name, None)
        if value is not None:
            given[name] = value
    if len(given) > 1:
        raise ValueError(f"give the decoding cache once, as `cache`; got {' and '.join(sorted(given))}")
    value = next(iter(given.values()), None)
    if value is not None and not isinstance(value, BMojoCache):
        got = type(value).__name__
        raise TypeError(f"the cache must be a BMojoCache (from a forward with use_cache=True), got {got}")
    return value


class BMojoCache:
    """Fixed-size decoding state of every layer; its size never depends on how many tokens were seen.

    Per layer (what applies to its type):

    * ``conv [B, conv_dim, K-1]``, ``ssm [B, H_ssm, P, N]`` (fp32): the SSM's convolution and recurrent state;
    * ``ring_k, ring_v [B, R, Hkv, D]``, ``ring_pos [B, R]``: the last ``R`` keys/values (``R = W``, or ``2W``
      when the ring also keeps the fading keys ``ring_kf, ring_vf`` of the span that left the window);
    * ``mem_* [B, M, ...]``: the eidetic memory (keys, values, positions, scores);
    * ``run_* [B, k_sel, ...]``: the current chunk's best candidates so far; ``prev_f [B, d]``: the last fading
      token, input of the innovation predictor.

    ``positions [B]`` is the position of the next token of each row. States are updated in place.
    """

    # transformers' generate() asks this before compiling the decoding step; ours is compiled by XLA, not there.
    is_compileable = False

    def __init__(self, config: BMojoConfig, layers: list[dict[str, torch.Tensor]], positions: torch.Tensor):
        self.config = config
        self.layers = layers
        self.positions = positions

    @classmethod
    def empty(cls, config: BMojoConfig, batch_size: int, device=None, dtype=torch.float32) -> "BMojoCache":
        """A cache for decoding from position 0."""
        layers = [_empty_layer_state(config, t, batch_size, device, dtype) for t in config.layers_block_type]
        return cls(config, layers, torch.zeros(batch_size, dtype=torch.long, device=device))

    @property
    def batch_size(self) -> int:
        return self.positions.shape[0]

    @property
    def is_linear(self) -> list[bool]:
        """Every layer's state is a fixed-size recurrence (transformers 5.2x: a cache it must not slice by length)."""
        return [True] * len(self.layers)

    def nbytes(self) -> int:
        """Bytes held by the state tensors."""
        tensors = [t for layer in self.layers for t in layer.values()] + [self.positions]
        return sum(t.numel() * t.element_size() for t in tensors)

    def reorder_cache(self, beam_idx: torch.Tensor) -> "BMojoCache":
        """Select rows (beam search)."""
        for layer in self.layers:
            for name, t in layer.items():
                layer[name] = t.index_select(0, beam_idx.to(t.device))
        self.positions = self.positions.index_select(0, beam_idx.to(self.positions.device))
        return self

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.positions.max()) if self.positions.numel() else 0


def _ring_size(config: BMojoConfig, layer_type: str) -> int:
    return 2 * config.window_size if layer_type == "bmojo" and config.use_fading else config.window_size


def _empty_layer_state(config, layer_type, bsz, device, dtype) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    if config.layer_has_ssm(layer_type):
        conv_dim = config.ssm_inner_size + 2 * config.ssm_ngroups * config.ssm_state_size
        state["conv"] = torch.zeros(bsz, conv_dim, config.ssm_conv_kernel - 1, device=device, dtype=dtype)
        state_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # the scan state stays >= fp32
        state["ssm"] = torch.zeros(
            bsz, config.ssm_num_heads, config.ssm_head_dim, config.ssm_state_size, device=device, dtype=state_dtype
        )
    if layer_type == "ssm":
        return state
    ring = _ring_size(config, layer_type)
    kv = (bsz, ring, config.num_key_value_heads, config.head_dim)
    state["ring_k"] = torch.zeros(kv, device=device, dtype=dtype)
    state["ring_v"] = torch.zeros(kv, device=device, dtype=dtype)
    state["ring_pos"] = torch.full((bsz, ring), -1, dtype=torch.long, device=device)
    if layer_type == "bmojo" and config.use_fading:
        state["ring_kf"] = torch.zeros(kv, device=device, dtype=dtype)
        state["ring_vf"] = torch.zeros(kv, device=device, dtype=dtype)
    if layer_type == "bmojo" and config.eidetic:
        features = config.num_key_value_heads * config.head_dim
        for prefix, size in (("mem", config.memory_size), ("run", config.selections_per_chunk)):
            slots = empty_slots(bsz, size, features, device=device, dtype=dtype)
            for name, t in zip(Slots._fields, slots):
                state[f"{prefix}_{name}"] = t
        state["prev_f"] = torch.zeros(bsz, config.hidden_size, device=device, dtype=dtype)
    return state


def _slots(state, prefix) -> Slots:
    return Slots(*(state[f"{prefix}_{name}"] for name in Slots._fields))


def _store_slots(state, prefix, slots: Slots) -> None:
    for name, t in zip(Slots._fields, slots):
        state[f"{prefix}_{name}"].copy_(t)


@dataclass
class _SequenceInfo:
    """What every layer needs to know about the (rolled, right-padded) batch in a parallel forward."""

    cos: torch.Tensor  # [1, L, D/2]
    sin: torch.Tensor
    eid_cos: torch.Tensor  # [1, 1, D/2]: the fixed rotation of eidetic scores
    eid_sin: torch.Tensor
    valid: torch.Tensor | None  # [B, L] bool, None when nothing is padded
    lengths: torch.Tensor | None  # [B] long; set when the cache must be filled
    collect_state: bool


# ---------------------------------------------------------------------------------------------------------------
# Mixers
# ---------------------------------------------------------------------------------------------------------------
def _up(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (float64 stays float64): decay and normalisation math."""
    return x if x.dtype == torch.float64 else x.float()


class BMojoRMSNorm(nn.Module):
    def __init__(self, size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = _up(x)
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class BMojoGatedRMSNorm(nn.Module):
    """``rmsnorm(y * silu(z))`` per group of channels, so the result does not depend on how heads are sharded."""

    def __init__(self, size: int, groups: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.groups = groups
        self.eps = eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        x = (_up(y) * F.silu(_up(z))).unflatten(-1, (self.groups, -1))
        x = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).flatten(-2)
        return x.to(y.dtype) * self.weight


class BMojoSSM(nn.Module):
    """Mamba-2 mixer (SSD): input projection, causal depthwise conv, selective scan, gated RMSNorm, output
    projection. Maps ``[B, L, d] -> [B, L, d]``; in a B'MOJO layer its outputs are the fading tokens."""

    def __init__(self, config: BMojoConfig):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.inner = config.ssm_inner_size
        self.heads = config.ssm_num_heads
        self.head_dim = config.ssm_head_dim
        self.groups = config.ssm_ngroups
        self.state_size = config.ssm_state_size
        self.chunk_size = config.chunk_size
        self.conv_kernel = config.ssm_conv_kernel
        self.conv_dim = self.inner + 2 * self.groups * self.state_size
        self.in_proj = nn.Linear(self.hidden_size, self.inner + self.conv_dim + self.heads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.conv_kernel, groups=self.conv_dim, bias=True)
        self.dt_bias = nn.Parameter(torch.zeros(self.heads))
        self.A_log = nn.Parameter(torch.zeros(self.heads))
        self.D = nn.Parameter(torch.ones(self.heads))
        self.norm = BMojoGatedRMSNorm(self.inner, self.groups, config.rms_norm_eps)
        self.out_proj = nn.Linear(self.inner, self.hidden_size, bias=False)

    def _split(self, zxbcdt):
        return torch.split(zxbcdt, [self.inner, self.conv_dim, self.heads], dim=-1)

    def _heads(self, xbc):
        x, b, c = torch.split(xbc, [self.inner, self.groups * self.state_size, self.groups * self.state_size], dim=-1)
        lead = x.shape[:-1]
        return (
            x.reshape(*lead, self.heads, self.head_dim),
            b.reshape(*lead, self.groups, self.state_size),
            c.reshape(*lead, self.groups, self.state_size),
        )

    def forward(self, h: torch.Tensor, info: _SequenceInfo) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``h [B, L, d]`` -> fading tokens ``[B, L, d]`` and, if ``info.collect_state``, the decoding state."""
        z, xbc, dt = self._split(self.in_proj(h))
        valid = info.valid[..., None] if info.valid is not None else None
        if valid is not None:  # padding must leave the state untouched: zero inputs, zero step size
            xbc = xbc * valid
        conv_in = xbc
        xbc = F.silu(causal_conv1d(xbc, self.conv1d.weight[:, 0, :], self.conv1d.bias))
        dt = F.softplus(_up(dt) + _up(self.dt_bias))
        if valid is not None:
            xbc = xbc * valid
            dt = dt * valid
        x, b, c = self._heads(xbc)
        A = -torch.exp(_up(self.A_log))
        if current_backend() == "reference":
            y, final = ssd_ref(x, dt, A, b, c, D=self.D)
        else:
            y, final = ssd_chunked(x, dt, A, b, c, self.chunk_size, D=self.D)
        y = self.norm(y.reshape(*h.shape[:-1], self.inner), z)
        state = {}
        if info.collect_state:
            state = {"conv": conv_state_from_inputs(conv_in, info.lengths, self.conv_kernel), "ssm": final}
        return self.out_proj(y), state

    def step(self, h: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """One token ``h [B, d]`` -> fading token ``[B, d]``; updates ``state['conv']`` and ``state['ssm']``."""
        z, xbc, dt = self._split(self.in_proj(h))
        xbc, conv = causal_conv1d_step(state["conv"], xbc, self.conv1d.weight[:, 0, :], self.conv1d.bias)
        state["conv"].copy_(conv)
        x, b, c = self._heads(F.silu(xbc))
        dt = F.softplus(_up(dt) + _up(self.dt_bias))
        y, ssm = ssd_step(state["ssm"], x, dt, -torch.exp(_up(self.A_log)), b, c, D=self.D)
        state["ssm"].copy_(ssm)
        return self.out_proj(self.norm(y.reshape(h.shape[0], self.inner), z))


class BMojoAttention(nn.Module):
    """Attention mixer of ``"attention"`` and ``"bmojo"`` layers.

    ``"attention"``: sliding-window causal attention (window ``W``; ``W >= L`` is full attention).
    ``"bmojo"``: adds fading tokens from its own SSM and, with ``memory_size > 0``, the eidetic memory.
    """

    def __init__(self, config: BMojoConfig, layer_type: str):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.num_kv = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.window = config.window_size
        self.chunk_size = config.chunk_size
        d = config.hidden_size
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.num_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.num_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=False)
        is_bmojo = layer_type == "bmojo"
        self.use_fading = is_bmojo and config.use_fading
        self.use_eidetic = is_bmojo and config.eidetic
        self.ssm = BMojoSSM(config) if config.layer_has_ssm(layer_type) else None
        if self.use_eidetic:
            self.memory_size = config.memory_size
            self.selections = config.selections_per_chunk
            # Predicts token t's key from the fading token f_{t-1}; its error is the innovation score.
            self.innovation_predictor = nn.Linear(d, self.num_kv * self.head_dim)
            # The score averages over every key feature. Under tensor parallelism each rank holds some key heads;
            # `sum_over_shards` then all-reduces the partial sums so that every rank selects the same tokens.
            self.key_features = self.num_kv * self.head_dim
            self.sum_over_shards = _identity

    def _kv(self, h):
        lead = h.shape[:-1]
        k = self.k_proj(h).view(*lead, self.num_kv, self.head_dim)
        v = self.v_proj(h).view(*lead, self.num_kv, self.head_dim)
        return k, v

    def _qkv(self, h):
        q = self.q_proj(h).view(*h.shape[:-1], self.num_heads, self.head_dim)
        return (q, *self._kv(h))

    def _innovation(self, f_prev: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Squared error of predicting the key ``k [..., Hkv, D]`` from the previous fading token ``f_prev [..., d]``.

        Inputs are detached: the auxiliary loss trains the predictor only, and no gradient flows through the
        (hard) selection."""
        pred = self.innovation_predictor(f_prev.detach())
        return self.sum_over_shards((pred - k.detach().flatten(-2)).pow(2).sum(-1)) / self.key_features

    def forward(self, h: torch.Tensor, info: _SequenceInfo):
        """``h [B, L, d]`` -> ``(out [B, L, d], innovation_loss or None, state dict)``."""
        bsz, length, _ = h.shape
        q, k, v = self._qkv(h)
        q_rot, k_rot = apply_rope(q, info.cos, info.sin), apply_rope(k, info.cos, info.sin)
        state: dict[str, torch.Tensor] = {}
        f = None
        if self.ssm is not None:
            f, state = self.ssm(h, info)
        k_fade = v_fade = None
        if self.use_fading:
            kf, v_fade = self._kv(f)  # the fading path shares the key/value weights
            k_fade = apply_rope(kf, info.cos, info.sin)
        reference = current_backend() == "reference"
        aux = None
        q_eid = memory = eid_mask = None
        if self.use_eidetic:
            f_prev = F.pad(f, [0, 0, 1, 0])[:, :length]  # f_{t-1}; zeros before the first token
            err = self._innovation(f_prev, k)
            valid = info.valid
            aux = err.mean() if valid is None else (err * valid).sum() / valid.sum().clamp_min(1)
            scores = err.detach().float()
            if valid is not None:
                scores = scores.masked_fill(~valid, INVALID_SCORE)
            # Eidetic scores use the unrotated query against the key rotated to position -2W: a fixed distance.
            q_eid = apply_rope(q, info.eid_cos, info.eid_sin)
            if reference:
                eid_mask = eidetic_mask_ref(
                    scores.cpu(), self.chunk_size, self.selections, self.memory_size, self.window
                ).to(h.device)
            else:
                onehot, cand_score, cand_pos = topk_per_chunk(scores, self.chunk_size, self.selections)
                cand = Slots(
                    take_selected(onehot, k.flatten(-2)), take_selected(onehot, v.flatten(-2)), cand_pos, cand_score
                )
                seen, _ = memory_per_chunk(cand, self.memory_size)
                unflat = lambda t: t.unflatten(-1, (self.num_kv, self.head_dim))  # noqa: E731
                memory = (unflat(seen.k), unflat(seen.v), seen.pos, seen.valid)
            if info.collect_state:
                state.update(self._eidetic_state(cand, seen, f, info.lengths))
        if reference:
            out = bmojo_attention_ref(
                q_rot, k_rot, v, self.window, k_fade, v_fade, q_eid, k, eid_mask, key_mask=info.valid
            )
        else:
            out = bmojo_attention_chunked(
                q_rot, k_rot, v, self.window, self.chunk_size, k_fade, v_fade, q_eid, memory, key_mask=info.valid
            )
        if info.collect_state:
            state.update(self._ring_state(k_rot, v, k_fade, v_fade, info.lengths))
        return self.o_proj(out.reshape(bsz, length, -1)), aux, state

    # State for decoding after a parallel prefill ------------------------------------------------------------------
    def _ring_state(self, k, v, k_fade, v_fade, lengths):
        ring = 2 * self.window if self.use_fading else self.window
        last = (lengths - 1)[:, None]  # [B, 1]
        slot = torch.arange(ring, device=k.device)[None, :]
        pos = last - torch.remainder(last - slot, ring)  # latest position that landed in each slot
        idx = pos.clamp_min(0)[..., None, None].expand(-1, -1, self.num_kv, self.head_dim)
        empty = (pos < 0)[..., None, None]

        def take(x):
            return torch.gather(x, 1, idx).masked_fill(empty, 0)

        state = {"ring_k": take(k), "ring_v": take(v), "ring_pos": pos.masked_fill(pos < 0, -1)}
        if k_fade is not None:
            state["ring_kf"], state["ring_vf"] = take(k_fade), take(v_fade)
        return state

    def _eidetic_state(self, cand: Slots, seen: Slots, f, lengths):
        current = ((lengths - 1) // self.chunk_size)[:, None]  # chunk of each row's last token

        def at_chunk(field):
            idx = current.view(-1, *([1] * (field.dim() - 1))).expand(-1, 1, *field.shape[2:])
            return torch.gather(field, 1, idx)[:, 0]

        state = {}
        for prefix, slots in (("mem", seen), ("run", cand)):
            for name, t in zip(Slots._fields, slots):
                state[f"{prefix}_{name}"] = at_chunk(t)
        idx = (lengths - 1)[:, None, None].expand(-1, 1, f.shape[-1])
        state["prev_f"] = torch.gather(f, 1, idx)[:, 0].clone()
        return state

    # Decoding ------------------------------------------------------------------------------------------------------
    def step(self, h: torch.Tensor, state: dict[str, torch.Tensor], positions: torch.Tensor, cos, sin, eid_cos, eid_sin):
        """One token per row: ``h [B, d]`` at ``positions [B]`` -> ``[B, d]``; updates ``state`` in place."""
        bsz = h.shape[0]
        q, k, v = self._qkv(h[:, None])
        q_rot, k_rot = apply_rope(q, cos, sin)[:, 0], apply_rope(k, cos, sin)[:, 0]
        q, k, v = q[:, 0], k[:, 0], v[:, 0]
        ring = state["ring_pos"].shape[1]
        write = (torch.arange(ring, device=h.device)[None, :] == torch.remainder(positions, ring)[:, None])
        w4 = write[..., None, None]

        def put(name, value):
            state[name].copy_(torch.where(w4, value[:, None].to(state[name].dtype), state[name]))

        put("ring_k", k_rot)
        put("ring_v", v)
        state["ring_pos"].copy_(torch.where(write, positions[:, None], state["ring_pos"]))
        f = self.ssm.step(h, state) if self.ssm is not None else None
        if self.use_fading:
            kf, vf = self._kv(f[:, None])
            put("ring_kf", apply_rope(kf, cos, sin)[:, 0])
            put("ring_vf", vf[:, 0])
        q_eid = memory = None
        if self.use_eidetic:
            # A new chunk starts: the finished chunk's picks join the memory.
            boundary = ((torch.remainder(positions, self.chunk_size) == 0) & (positions > 0))[:, None]
            mem, run = _slots(state, "mem"), _slots(state, "run")
            merged = merge_slots(mem, run, self.memory_size)
            fresh = empty_slots(bsz, self.selections, run.k.shape[-1], device=h.device, dtype=run.k.dtype)
            _store_slots(state, "mem", Slots(*(_where_rows(boundary, a, b) for a, b in zip(merged, mem))))
            run = Slots(*(_where_rows(boundary, a, b) for a, b in zip(fresh, run)))
            score = self._innovation(state["prev_f"], k).float()
            new = Slots(k.flatten(-2)[:, None], v.flatten(-2)[:, None], positions[:, None], score[:, None])
            _store_slots(state, "run", merge_slots(run, new, self.selections))
            state["prev_f"].copy_(f)
            mem = _slots(state, "mem")
            unflat = lambda t: t.unflatten(-1, (self.num_kv, self.head_dim))  # noqa: E731
            memory = (unflat(mem.k), unflat(mem.v), mem.pos, mem.valid)
            q_eid = apply_rope(q[:, None], eid_cos, eid_sin)[:, 0]
        out = bmojo_attention_step(
            q_rot,
            positions,
            state["ring_k"],
            state["ring_v"],
            state["ring_pos"],
            self.window,
            state.get("ring_kf"),
            state.get("ring_vf"),
            q_eid,
            memory,
        )
        return self.o_proj(out.reshape(bsz, -1))


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _where_rows(cond: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row select: ``cond [B, 1]``."""
    return torch.where(cond.view(-1, *([1] * (a.dim() - 1))), a, b)


class BMojoMLP(nn.Module):
    def __init__(self, config: BMojoConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# ---------------------------------------------------------------------------------------------------------------
# Block
# ---------------------------------------------------------------------------------------------------------------
class BMojoBlock(nn.Module):
    """pre-RMSNorm -> mixer -> residual -> pre-RMSNorm -> SwiGLU MLP -> residual (MLP optional)."""

    def __init__(self, config: BMojoConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.layer_type = config.layers_block_type[layer_idx]
        self.input_norm = BMojoRMSNorm(config.hidden_size, config.rms_norm_eps)
        if self.layer_type == "ssm":
            self.mixer = BMojoSSM(config)
        else:
            self.mixer = BMojoAttention(config, self.layer_type)
        self.mlp = None
        if config.use_mlp:
            self.post_mixer_norm = BMojoRMSNorm(config.hidden_size, config.rms_norm_eps)
            self.mlp = BMojoMLP(config)

    def _mlp(self, x):
        return x if self.mlp is None else x + self.mlp(self.post_mixer_norm(x))

    def forward(self, x: torch.Tensor, info: _SequenceInfo):
        h = self.input_norm(x)
        if self.layer_type == "ssm":
            out, state = self.mixer(h, info)
            aux = None
        else:
            out, aux, state = self.mixer(h, info)
        return self._mlp(x + out), aux, state

    def step(self, x: torch.Tensor, state, positions, rope) -> torch.Tensor:
        h = self.input_norm(x)
        out = self.mixer.step(h, state) if self.layer_type == "ssm" else self.mixer.step(h, state, positions, *rope)
        return self._mlp(x + out)


# ---------------------------------------------------------------------------------------------------------------
# Pretrained base
# ---------------------------------------------------------------------------------------------------------------
def _init(tensor: torch.Tensor, fn) -> None:
    # Leave tensors loaded from a checkpoint alone (transformers marks them).
    if not getattr(tensor, "_is_hf_initialized", False):
        with torch.no_grad():
            fn(tensor)


class BMojoPreTrainedModel(PreTrainedModel):
    config_class = BMojoConfig
    base_model_prefix = "model"
    _no_split_modules = ["BMojoBlock"]
    supports_gradient_checkpointing = False
    _is_stateful = True  # a recurrent state cannot be rolled back: no assisted decoding

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            _init(module.weight, lambda t: t.normal_(0.0, std))
            if module.bias is not None:
                _init(module.bias, torch.nn.init.zeros_)
        elif isinstance(module, nn.Embedding):
            _init(module.weight, lambda t: t.normal_(0.0, std))
        elif isinstance(module, (BMojoRMSNorm, BMojoGatedRMSNorm)):
            _init(module.weight, torch.nn.init.ones_)
        elif isinstance(module, nn.Conv1d):
            bound = module.kernel_size[0] ** -0.5
            _init(module.weight, lambda t: t.uniform_(-bound, bound))
            _init(module.bias, lambda t: t.uniform_(-bound, bound))
        elif isinstance(module, BMojoSSM):
            cfg = self.config
            # S4D-real style decays A = -[1, 16] and log-uniform step sizes in [dt_min, dt_max] (as Mamba-2).
            _init(module.A_log, lambda t: t.copy_(torch.log(torch.empty_like(t).uniform_(1, 16))))
            _init(module.D, torch.nn.init.ones_)

            def dt_bias(t):
                lo, hi = torch.log(torch.tensor(cfg.ssm_dt_min)), torch.log(torch.tensor(cfg.ssm_dt_max))
                dt = torch.exp(torch.rand_like(t) * (hi - lo) + lo).clamp_min(cfg.ssm_dt_init_floor)
                t.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

            _init(module.dt_bias, dt_bias)


# ---------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------
class _CacheAlias:
    """``output.cache_params`` answers ``output.cache`` on every transformers line (5.2x has it built in)."""

    @property
    def cache_params(self) -> BMojoCache | None:
        return self.cache


@dataclass
class BMojoModelOutput(_CacheAlias, ModelOutput):
    """``last_hidden_state [B, L, d]``; ``cache``: the decoding state after the last token (``use_cache=True``);
    ``hidden_states``: the input of every layer and the final normed output (``output_hidden_states=True``)."""

    last_hidden_state: torch.Tensor | None = None
    cache: BMojoCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    innovation_loss: torch.Tensor | None = None


@dataclass
class BMojoCausalLMOutput(_CacheAlias, ModelOutput):
    """``loss = lm_loss + innovation_loss_weight * innovation_loss`` is what training backpropagates;
    ``lm_loss`` and ``innovation_loss`` are reported separately."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    innovation_loss: torch.Tensor | None = None
    cache: BMojoCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


# ---------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------
class BMojoModel(BMojoPreTrainedModel):
    def __init__(self, config: BMojoConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([BMojoBlock(config, i) for i in range(config.num_hidden_layers)])
        self.norm = BMojoRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def _check_input_ids(self, input_ids: torch.Tensor) -> None:
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.dtype.is_floating_point or input_ids.dtype in (torch.bool, torch.complex64, torch.complex128):
            raise TypeError(f"input_ids must be an integer tensor (torch.long), got dtype {input_ids.dtype}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape [batch, length], got {tuple(input_ids.shape)}")
        if input_ids.numel() == 0:
            raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}): give at least one token per row")
        if input_ids.device.type != "xla":  # a data-dependent check would force a graph sync on XLA
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(
                    f"token ids must lie in [0, {self.config.vocab_size}) (vocab_size); got values in [{lo}, {hi}]"
                )

    def _rope(self, positions: torch.Tensor):
        cfg = self.config
        dtype = self.embed_tokens.weight.dtype
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, dtype)
        eid_cos, eid_sin = rope_cos_sin(
            torch.full((1, 1), 2 * cfg.window_size, device=positions.device), cfg.head_dim, cfg.rope_theta, dtype
        )
        return cos, sin, eid_cos, eid_sin

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: BMojoCache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BMojoModelOutput | tuple:
        """``input_ids [B, L]`` (left- or right-padded, with ``attention_mask [B, L]``).

        Without ``cache``: a parallel forward; with ``use_cache`` it also returns the decoding state.
        With ``cache`` (also accepted as ``cache_params`` or ``past_key_values``): the tokens are decoded one at a
        time from that state, which is updated in place (``attention_mask`` is then ignored: a cached row has no
        padding ahead of it). ``output_hidden_states`` and ``return_dict`` mean the same on both paths;
        ``output_attentions`` is refused (the joint softmax over three key sets has no per-token attention map).
        """
        cache = pop_cache_argument(cache, kwargs)
        _refuse_unsupported_outputs(kwargs)
        if input_ids is None:
            raise ValueError("input_ids is required (inputs_embeds is not supported)")
        self._check_input_ids(input_ids)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if cache is not None:
            out = self._decode(input_ids, cache, output_hidden_states)
            return out if return_dict else out.to_tuple()
        bsz, length = input_ids.shape
        shift = None
        valid = None
        lengths = None
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
                )
            mask = attention_mask.to(torch.long)
            # On XLA, value checks would force a host sync and a data-dependent branch: a given mask is always
            # applied (rows are rolled even when nothing is padded) and trusted to be left/right padding.
            on_xla = input_ids.device.type == "xla"
            if on_xla or not bool(mask.all()):
                lengths = mask.sum(-1)
                if not on_xla and bool((lengths == 0).any()):
                    raise ValueError("every row of attention_mask needs at least one real token")
                shift = mask.argmax(-1)  # index of the first real token
                input_ids = _roll_rows(input_ids, shift)
                valid = torch.arange(length, device=input_ids.device)[None, :] < lengths[:, None]
                if not on_xla and not bool((_roll_rows(mask, shift).bool() == valid).all()):
                    raise ValueError("attention_mask must mark one contiguous run of tokens per row (left or right padding)")
        if use_cache and lengths is None:
            lengths = torch.full((bsz,), length, dtype=torch.long, device=input_ids.device)
        if use_cache and current_backend() == "reference":
            raise ValueError("the reference backend does not build decoding caches; use the chunked backend")
        cos, sin, eid_cos, eid_sin = self._rope(torch.arange(length, device=input_ids.device)[None, :])
        info = _SequenceInfo(cos, sin, eid_cos, eid_sin, valid, lengths, bool(use_cache))
        x = self.embed_tokens(input_ids)
        hidden_states = [] if output_hidden_states else None
        aux_losses = []
        states = []
        for layer in self.layers:
            if hidden_states is not None:
                hidden_states.append(x)
            x, aux, state = layer(x, info)
            if aux is not None:
                aux_losses.append(aux)
            states.append(state)
        x = self.norm(x)
        if hidden_states is not None:
            hidden_states.append(x)
            hidden_states = [_roll_rows(t, -shift) if shift is not None else t for t in hidden_states]
        if shift is not None:
            x = _roll_rows(x, -shift)
        new_cache = BMojoCache(self.config, states, lengths.clone()) if use_cache else None
        innovation = torch.stack(aux_losses).mean() if aux_losses else None
        out = BMojoModelOutput(x, new_cache, tuple(hidden_states) if hidden_states else None, innovation)
        return out if return_dict else out.to_tuple()

    def _decode(self, input_ids, cache: BMojoCache, output_hidden_states) -> BMojoModelOutput:
        if input_ids.shape[0] != cache.batch_size:
            raise ValueError(f"input_ids has {input_ids.shape[0]} rows but the cache holds {cache.batch_size}")
        outputs, per_layer = [], []
        for t in range(input_ids.shape[1]):
            layer_inputs = [] if output_hidden_states else None
            outputs.append(self.step(input_ids[:, t], cache, layer_inputs))
            per_layer.append(layer_inputs)
        hidden_states = None
        if output_hidden_states:  # same layout as the parallel forward: one [B, L, d] per layer input + final
            hidden_states = tuple(torch.stack(h, dim=1) for h in zip(*per_layer))
        return BMojoModelOutput(torch.stack(outputs, dim=1), cache, hidden_states, None)

    def step(self, token: torch.Tensor, cache: BMojoCache, hidden_states: list | None = None) -> torch.Tensor:
        """Decode one token per row (``token [B]``): returns the final hidden state ``[B, d]``.

        ``hidden_states``, if a list, receives every layer's input and then the final hidden state (each ``[B, d]``).
        """
        positions = cache.positions
        rope = self._rope(positions[:, None])
        x = self.embed_tokens(token)
        for layer, state in zip(self.layers, cache.layers):
            if hidden_states is not None:
                hidden_states.append(x)
            x = layer.step(x, state, positions, rope)
        cache.positions = positions + 1
        x = self.norm(x)
        if hidden_states is not None:
            hidden_states.append(x)
        return x


def _refuse_unsupported_outputs(kwargs: dict) -> None:
    if kwargs.get("output_attentions"):
        raise ValueError(
            "output_attentions is not supported: a B'MOJO layer attends under one softmax over window, fading and "
            "eidetic keys, which has no per-token attention map"
        )


def _roll_rows(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Row ``b`` of the result is row ``b`` of ``x`` rotated left by ``shift[b]`` along dim 1."""
    length = x.shape[1]
    idx = torch.remainder(torch.arange(length, device=x.device)[None, :] + shift[:, None], length)
    idx = idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return torch.gather(x, 1, idx)


# ---------------------------------------------------------------------------------------------------------------
# Causal LM
# ---------------------------------------------------------------------------------------------------------------
class BMojoForCausalLM(BMojoPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: BMojoConfig):
        super().__init__(config)
        self.model = BMojoModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cache: BMojoCache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> BMojoCausalLMOutput | tuple:
        """Logits ``[B, L, vocab]``; with ``labels [B, L]`` (``-100`` ignored) the shifted next-token loss.

        ``cache`` (or ``cache_params`` / ``past_key_values``) decodes from a fixed-size state, see ``BMojoModel``.
        """
        cache = pop_cache_argument(cache, kwargs)
        _refuse_unsupported_outputs(kwargs)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        out = self.model(
            input_ids,
            attention_mask=attention_mask,
            cache=cache,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = lm_loss = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(input_ids.shape)}")
            lm_loss = F.cross_entropy(
                _up(logits[:, :-1]).flatten(0, 1), labels[:, 1:].flatten().to(logits.device), ignore_index=-100
            )
            loss = lm_loss
            if out.innovation_loss is not None:
                loss = lm_loss + self.config.innovation_loss_weight * out.innovation_loss
        result = BMojoCausalLMOutput(loss, logits, lm_loss, out.innovation_loss, out.cache, out.hidden_states)
        return result if return_dict else result.to_tuple()

    # generate() support ----------------------------------------------------------------------------------------------
    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # we bring our own fixed-size cache (``BMojoCache``)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, use_cache=True, **kwargs):
        # transformers passes the cache under CACHE_KWARG; a user may pass it under any alias.
        cache = pop_cache_argument(kwargs.get("cache"), {k: kwargs.get(k) for k in CACHE_ALIASES[1:]})
        inputs = {k: kwargs[k] for k in ("output_hidden_states", "logits_to_keep") if kwargs.get(k) is not None}
        if cache is not None:
            # The cache already holds every token but the newest one: feed exactly one token per step.
            return {**inputs, "input_ids": input_ids[:, -1:], "cache": cache, "use_cache": True}
        return {**inputs, "input_ids": input_ids, "attention_mask": attention_mask, "use_cache": use_cache}

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False, num_new_tokens=1):
        for name in CACHE_ALIASES:
            model_kwargs.pop(name, None)
        if outputs.cache is not None:  # (use_cache=False: no cache, and no key that beam search would reorder)
            model_kwargs[CACHE_KWARG] = outputs.cache
        mask = model_kwargs.get("attention_mask")
        if mask is not None:
            model_kwargs["attention_mask"] = torch.cat([mask, mask.new_ones(mask.shape[0], num_new_tokens)], dim=-1)
        return model_kwargs

    def _reorder_cache(self, cache, beam_idx):
        return None if cache is None else cache.reorder_cache(beam_idx)
