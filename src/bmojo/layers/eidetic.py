"""The eidetic memory: the innovation score, per-chunk selection, retention, and the memory's decoding state.

Source: Zancato et al., "B'MOJO: Hybrid State Space Realizations of Foundation Models with Eidetic and Fading
Memory" (NeurIPS 2024), Sec. 3: a token is worth remembering verbatim when the SSM's state could not predict it.
Here the *innovation score* of token ``t`` is the squared error of predicting its key from the previous fading
token ``f_{t-1}`` (a learned linear predictor, trained by an auxiliary loss). The policy (top-k per chunk, a
fixed-size memory keeping the best scores, visibility once a token left the window) is stated in
``ops/selection/chunk.py``; its forms live there, the memory type ``EideticMemory`` in ``ops/selection/common.py``.

Under tensor parallelism each rank holds some key heads, so the score's sum over key features is split over the
ranks: it passes through ``PartialSum``, the hook point that the sharding plan binds to an all-reduce. The
``learned_selection`` bias ``u`` is the converse: computed alike on every rank (replicated ``h`` and weights) but
read by each rank's own heads, so its gradient is a sum over ranks: ``u`` passes through ``SumGradientOverShards``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import dispatch
from ..ops.common import cast, compute_dtype
from ..ops.selection import INVALID_SCORE, EideticMemory, empty_slots, map_slots, merge_slots
from .common import InferenceState


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class PartialSum(nn.Module):
    """Marks a sum whose terms tensor parallelism splits over ranks: the identity on one device. The sharding
    plan (``parallel/plan.py``, style ``"sum_over_shards"``) calls ``bind`` with the backend's all-reduce (forward
    sum, identity backward: Megatron's ``g``). Holds no parameters."""

    def __init__(self):
        super().__init__()
        self.reduce: Callable[[torch.Tensor], torch.Tensor] = _identity

    def bind(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.reduce = reduce

    def forward(self, partial: torch.Tensor) -> torch.Tensor:
        return self.reduce(partial)


class SumGradientOverShards(nn.Module):
    """Marks a replicated tensor that each tensor-parallel rank feeds to its own heads only: the identity on one
    device. The sharding plan (style ``"copy_to_shards"``) calls ``bind`` with the backend's identity forward whose
    backward sums the gradient over the ranks (Megatron's ``f``), so the replicated layer upstream gets the full
    gradient, the same on every rank. Holds no parameters."""

    def __init__(self):
        super().__init__()
        self.reduce: Callable[[torch.Tensor], torch.Tensor] = _identity

    def bind(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.reduce = reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduce(x)


def _prediction(predictor: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``predictor(x)`` in ``compute_dtype(x)`` (float32 for a bf16 model): a plain linear layer is applied to
    upcast weights, so a bf16 model's scores do not depend on how its matmuls round (decoding and the parallel
    forward then rank tokens alike); a sharded one (tensor parallelism) runs as it is and is upcast after."""
    ctype = compute_dtype(x)
    if isinstance(predictor, nn.Linear):
        bias = None if predictor.bias is None else cast(predictor.bias, ctype)
        return F.linear(cast(x, ctype), cast(predictor.weight, ctype), bias)
    return cast(predictor(x), ctype)


def innovation_error(
    predictor: nn.Module, partial_sum: PartialSum, f_prev, k, key_features: int, per_head: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``selection_score="key_prediction"``: mean squared error ``[...]`` of predicting the key ``k [..., Hkv, D]``
    from the previous fading token ``f_prev [..., d]``, averaged over all ``key_features`` (global, also when
    sharded); float32 at least (float64 in a float64 model).

    With ``per_head`` also each key head's own part, ``[..., Hkv]`` (mean over its ``D`` features; local to the
    rank under tensor parallelism, which is what that rank's heads select by): returns ``(err, err_per_head)``.

    Inputs are detached: the auxiliary loss trains the predictor only, and no gradient flows through the (hard)
    selection."""
    pred = _prediction(predictor, f_prev.detach())
    sq = (pred - cast(k.detach().flatten(-2), pred.dtype)).pow(2)
    err = partial_sum(sq.sum(-1)) / key_features
    if not per_head:
        return err
    return err, sq.unflatten(-1, k.shape[-2:]).mean(-1)


def next_input_error(predictor: nn.Module, f_prev: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``selection_score="next_input"`` (the paper's innovation test): mean squared error ``[...]`` of predicting
    the layer input ``h [..., d]`` from the previous fading token ``f_prev [..., d]``, averaged over the ``d``
    features; float32 at least. Inputs are detached as in ``innovation_error``. Under tensor parallelism ``h``,
    ``f_prev`` and the predictor are replicated: no sum over shards."""
    pred = _prediction(predictor, f_prev.detach())
    return (pred - cast(h.detach(), pred.dtype)).pow(2).mean(-1)


_MASK31 = 0x7FFFFFFF


def random_score(layer_idx: int, positions: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """``selection_score="random"``: the random-choice baseline. An integer hash of ``(layer_idx, absolute
    position, token id)`` mapped to ``[0, 1)`` (float32, the broadcast shape of ``positions`` and ``token_ids``,
    both integer; e.g. ``[1, L]`` and ``[B, L]`` in the parallel forward, ``[B]`` and ``[B]`` in a decoding step).

    Every input enters exactly, so a token gets the same score in the parallel forward and in decoding (and in a
    left-padded row, whose tokens keep their own ids and positions); the token id makes the draw differ between
    examples, so a task whose structure sits at fixed positions (MQAR's key-value pairs) is not met by a fixed
    positional policy; the layer index gives each layer its own draw. Not a function of the content beyond the
    token at that position: two rows with the same token at the same position score it the same.

    Every product and sum is cut to 31 bits before the next step, so int32 arithmetic (wrapping) and int64 give the
    same bits (an accelerator may run ``long`` as int32); the top 24 bits are exact in float32.

    Raises ``ValueError`` when ``token_ids`` is ``None`` (the model passes them for ``"random"`` layers)."""
    if token_ids is None:
        raise ValueError('selection_score="random" needs the token ids (SequenceInfo.token_ids / step token_ids)')
    return (random_bits(layer_idx, positions.long(), token_ids.long()) >> 7).float() / float(1 << 24)


def random_bits(layer_idx: int, positions: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """``random_score``'s 31-bit hash, in the integer dtype of ``positions`` and ``token_ids`` (int32 or int64:
    the same bits, as every step is masked to 31 bits and the multipliers are below ``2**31``)."""
    x = (positions * 0x2545F491 + (((layer_idx + 1) * 0x7F4A7C15) & _MASK31)) & _MASK31
    x = ((x ^ (x >> 15)) * 0x2C1B3C6D) & _MASK31
    x = x ^ ((token_ids * 0x1B873593) & _MASK31)  # the token enters once the position is mixed
    x = ((x ^ (x >> 16)) * 0x297A2D39) & _MASK31
    x = ((x ^ (x >> 13)) * 0x2545F491) & _MASK31
    x = ((x ^ (x >> 15)) * 0x2C1B3C6D) & _MASK31
    return x ^ (x >> 16)


def recency_score(positions: torch.Tensor) -> torch.Tensor:
    """``selection_score="recency"``: ``position + 1`` as float32 (newest wins its chunk, and the memory keeps the
    newest picks). Exact up to position ``2**24 - 1``; beyond, neighbouring positions tie (the earlier wins)."""
    return (positions + 1).float()


def innovation_loss(err: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """The auxiliary loss: mean of ``err [B, L]`` over real tokens."""
    return err.mean() if valid is None else (err * valid).sum() / valid.sum().clamp_min(1)


class SelectionBias(nn.Linear):
    """``learned_selection``'s ``Linear(d, 1)`` giving ``u_t`` from the layer input ``h_t``; the model initialises
    its weight and bias to zero (``BMojoPreTrainedModel._init_weights``), so a fresh layer ranks by the score alone
    and adds nothing to the eidetic logits."""

    def __init__(self, hidden_size: int):
        super().__init__(hidden_size, 1)


def selection_bias_logit(layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """``learned_selection``: ``u = layer(h)`` ``[...]`` clamped to ``[-10, 10]``, float32 at least (the dtype of
    the memory's ``bias``); not detached (the LM loss trains ``layer`` through the selected tokens' logits)."""
    return _prediction(layer, h)[..., 0].clamp(-10.0, 10.0)


def selection_scores(
    err: torch.Tensor, valid: torch.Tensor | None, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Scores the selection ranks by: ``err`` detached, float32, times ``exp(bias)`` when given (``bias`` broadcasts
    against ``err``), ``INVALID_SCORE`` at padding and wherever it is not finite (a non-finite score never gets
    selected)."""
    scores = cast(err.detach(), torch.float32)
    if bias is not None:
        scores = scores * torch.exp(cast(bias.detach(), torch.float32))
    invalid = ~torch.isfinite(scores)
    if valid is not None:
        invalid = invalid | ~valid.view(*valid.shape, *([1] * (scores.dim() - valid.dim())))
    return scores.masked_fill(invalid, INVALID_SCORE)


def select(
    scores, k, v, chunk_size: int, selections: int, capacity: int, bias=None, **retention
) -> tuple[EideticMemory, EideticMemory]:
    """Per-chunk selection and retention over a sequence (``k, v [B, L, Hkv, D]``, ``bias [B, L]`` or ``None``):
    ``(picks, seen)`` as in ``ops.selection.select_per_chunk`` (``retention``: its ``decay``, ``delay``,
    ``doc_start``), with ``seen``'s keys and values in heads ``[B, nC, M, Hkv, D]``."""
    heads = k.shape[-2:]
    flat_k, flat_v = k.flatten(-2), v.flatten(-2)
    picks, seen = dispatch("eidetic_selection")(
        scores, flat_k, flat_v, chunk_size, selections, capacity, bias=bias, **retention
    )
    return picks, seen._replace(k=seen.k.unflatten(-1, heads), v=seen.v.unflatten(-1, heads))


@dataclass
class EideticState(InferenceState):
    """The memory's decoding state: ``mem_* [B, M, ...]`` the memory (keys, values, positions, scores),
    ``run_* [B, k_sel, ...]`` the current chunk's best candidates so far, ``prev_f [B, d]`` the last fading token
    (input of the innovation predictor). Keys and values are flattened over heads (``F = Hkv * D``).

    With ``memory_admission="window_exit"`` (a delay of ``D = W / C`` chunks), ``wait_* [B, D * k_sel, ...]`` holds
    the picks of the last ``D`` finished chunks, oldest first, that have not joined the memory yet (``wait_bias``
    with ``learned_selection``); otherwise those fields are ``None``.

    ``learned_selection``: ``mem_bias [B, M]`` and ``run_bias [B, k_sel]`` hold each slot's logit bias (float32,
    float64 in a float64 model). ``memory_per_kv_head``: every key/value head has its own memory, so each field
    but ``prev_f`` gains a head axis after the batch: ``mem_k [B, Hkv, M, D]``, ``mem_pos [B, Hkv, M]``, ...
    (rows stay first, so beam search reorders them as any state)."""

    mem_k: torch.Tensor | None = None
    mem_v: torch.Tensor | None = None
    mem_pos: torch.Tensor | None = None
    mem_score: torch.Tensor | None = None
    run_k: torch.Tensor | None = None
    run_v: torch.Tensor | None = None
    run_pos: torch.Tensor | None = None
    run_score: torch.Tensor | None = None
    prev_f: torch.Tensor | None = None
    mem_bias: torch.Tensor | None = None
    run_bias: torch.Tensor | None = None
    wait_k: torch.Tensor | None = None
    wait_v: torch.Tensor | None = None
    wait_pos: torch.Tensor | None = None
    wait_score: torch.Tensor | None = None
    wait_bias: torch.Tensor | None = None

    @property
    def per_head(self) -> bool:
        return self.mem_pos.dim() == 3

    def _slots(self, prefix: str) -> EideticMemory:
        """The ``mem``/``run``/``wait`` fields as one ``EideticMemory`` of ``[rows, S, ...]`` views (``rows = B``,
        or ``B * Hkv`` per head): updates through them land in the state."""
        fields = [getattr(self, f"{prefix}_{name}") for name in EideticMemory._fields]
        if self.per_head:
            fields = [None if t is None else t.view(-1, *t.shape[2:]) for t in fields]
        return EideticMemory(*fields)

    @property
    def memory(self) -> EideticMemory:
        return self._slots("mem")

    @property
    def running(self) -> EideticMemory:
        return self._slots("run")


    @property
    def waiting(self) -> EideticMemory:
        return self._slots("wait")

    @staticmethod
    def _store(target: EideticMemory, slots: EideticMemory) -> None:
        for t, new in zip(target, slots):
            if t is not None:
                t.copy_(new)

    @staticmethod
    def admission_delay(config) -> int:
        """Chunks a pick waits beyond its own before joining the memory: ``W / C`` for ``"window_exit"``, else 0."""
        return config.window_size // config.chunk_size if config.memory_admission == "window_exit" else 0

    @classmethod
    def allocate(cls, config, batch_size: int, device=None, dtype=torch.float32) -> "EideticState":
        heads = config.num_key_value_heads if config.memory_per_kv_head else 1
        features = config.num_key_value_heads * config.head_dim // heads
        bias_dtype = compute_dtype(dtype) if config.learned_selection else None

        def slots(size):
            made = empty_slots(batch_size * heads, size, features, device=device, dtype=dtype, bias_dtype=bias_dtype)
            return made if heads == 1 else map_slots(lambda t: t.view(batch_size, heads, *t.shape[1:]), made)

        mem, run = slots(config.memory_size), slots(config.selections_per_chunk)
        prev_f = torch.zeros(batch_size, config.hidden_size, device=device, dtype=dtype)
        mem, run = slots(config.memory_size), slots(config.selections_per_chunk)
        prev_f = torch.zeros(batch_size, config.hidden_size, device=device, dtype=dtype)
        state = cls(*mem[:4], *run[:4], prev_f, mem.bias, run.bias)
        delay = cls.admission_delay(config)
        if delay:
            wait = slots(delay * config.selections_per_chunk)
            state.wait_k, state.wait_v, state.wait_pos, state.wait_score, state.wait_bias = wait
        return state

    @classmethod
    def from_prefill(
        cls,
        picks: EideticMemory,
        seen: EideticMemory,
        f,
        lengths,
        chunk_size: int,
        delay: int = 0,
        heads: int | None = None,
    ) -> "EideticState":
        """The state after each row's last token (``lengths [B]``): the memory and picks of that token's chunk (and,
        with ``delay``, the picks of the ``delay`` chunks before it, which have not joined the memory yet).
        ``heads``: per-head memories (``memory_per_kv_head``), whose rows ``picks``/``seen`` hold as ``B * heads``
        rows (row ``b * heads + a`` is head ``a`` of row ``b``)."""
        bsz = lengths.shape[0]
        rows = lengths if heads is None else lengths.repeat_interleave(heads)
        current = ((rows - 1) // chunk_size)[:, None]  # chunk of each row's last token

        def at_chunk(field, offset=0):  # [rows, nC, S, ...] -> [rows, S, ...] at each row's chunk (+ offset)
            field = field.flatten(3) if field.dim() > 4 else field  # keys/values in heads -> features
            idx = (current + offset).view(-1, *([1] * (field.dim() - 1))).expand(-1, 1, *field.shape[2:])
            return torch.gather(field, 1, idx)[:, 0]

        def per_row(t):  # [rows, S, ...] -> [B, S, ...], or [B, heads, S, ...]
            return t if heads is None else t.view(bsz, heads, *t.shape[1:])

        idx = (lengths - 1)[:, None, None].expand(-1, 1, f.shape[-1])
        prev_f = torch.gather(f, 1, idx)[:, 0].clone()
        mem = map_slots(lambda t: per_row(at_chunk(t)), seen)
        run = map_slots(lambda t: per_row(at_chunk(t)), picks)
        state = cls(*mem[:4], *run[:4], prev_f, mem.bias, run.bias)
        if delay:
            # Chunks current - delay .. current - 1, oldest first; chunks before 0 are empty.
            num_rows, _, sel = picks.pos.shape
            bias_dtype = None if picks.bias is None else picks.bias.dtype
            empty = empty_slots(
                num_rows, delay * sel, picks.k.shape[-1], device=picks.k.device, dtype=picks.k.dtype,
                bias_dtype=bias_dtype,
            )  # fmt: skip
            padded = map_slots(
                lambda e, p: torch.cat([e.view(num_rows, delay, sel, *p.shape[3:]), p], dim=1), empty, picks
            )
            wait = map_slots(lambda p: per_row(torch.cat([at_chunk(p, j) for j in range(delay)], dim=1)), padded)
            state.wait_k, state.wait_v, state.wait_pos, state.wait_score, state.wait_bias = wait
        return state

    # Long on purpose: one decoding step of the policy in order (boundary merge, then the token's candidacy).
    def step(
        self,
        k,
        v,
        score,
        f,
        positions,
        chunk_size: int,
        selections: int,
        capacity: int,
        bias=None,
        *,
        decay: float = 1.0,
        delay: int = 0,
        doc_start: torch.Tensor | None = None,
        boundary: torch.Tensor | None = None,
        any_boundary: bool = True,
    ) -> EideticMemory:
        """Token at ``positions [B, 1]`` with key/value ``k, v [B, Hkv, D]``, selection score ``score [B]`` (per
        head: ``[B, Hkv]``), fading token ``f [B, d]`` and (``learned_selection``) logit bias ``bias [B]``: updates
        the state in place and returns the memory its query sees (``[B, M, Hkv, D]``; per head ``[B * Hkv, M, 1,
        D]``, the rows of a head-folded attention).

        At a chunk boundary the finished chunk's picks join the memory first (with ``delay``, they queue and the
        picks of the chunk ``delay`` before it join), slots age by ``decay`` and, given ``doc_start [B]`` (the
        token's document start), slots from earlier documents leave; then the token competes for the current
        chunk's picks. ``boundary [B, 1]`` (bool): whether the token opens a chunk (``StepInfo.chunk_start``, shared
        by the layers of a step); made from ``positions`` when ``None``. ``any_boundary=False`` (known on the host:
        no row opens a chunk, ``StepInfo.any_chunk_start``) skips the boundary work, which would change nothing."""
        heads = k.shape[-2:]
        if boundary is None:
            boundary = (torch.remainder(positions, chunk_size) == 0) & (positions > 0)  # [B, 1]
        if self.per_head:  # every (row, head) is a row of its own
            num_kv = k.shape[1]
            k, v, score = k.flatten(0, 1)[:, None], v.flatten(0, 1)[:, None], score.flatten()
            positions = positions.repeat_interleave(num_kv, 0)
            boundary = boundary.repeat_interleave(num_kv, 0)
            bias = None if bias is None else bias.repeat_interleave(num_kv, 0)
            doc_start = None if doc_start is None else doc_start.repeat_interleave(num_kv, 0)
            heads = (1, k.shape[-1])
        rows = k.shape[0]
        run = self.running
        if any_boundary:
            self._chunk_boundary(boundary, chunk_size, selections, capacity, decay, delay, doc_start)
            # At a boundary the finished chunk's picks have left: its slots compete as empty ones (score
            # INVALID_SCORE, position 0, as ``empty_slots``); an empty slot is never kept, so its key is not read.
            run = run._replace(
                pos=run.pos.masked_fill(boundary, 0), score=run.score.masked_fill(boundary, INVALID_SCORE)
            )
        new = EideticMemory(
            k.reshape(rows, 1, -1), v.reshape(rows, 1, -1), positions, score[:, None],
            None if run.bias is None else cast(bias[:, None], run.bias.dtype),
        )  # fmt: skip
        self._store(self.running, merge_slots(run, new, selections))
        self.prev_f.copy_(f)
        memory = self.memory
        return memory._replace(k=memory.k.unflatten(-1, heads), v=memory.v.unflatten(-1, heads))

    def _chunk_boundary(self, boundary, chunk_size, selections, capacity, decay, delay, doc_start) -> None:
        """In the rows where ``boundary [rows, 1]``: the picks of the chunk that ended (or, with ``delay``, of the
        oldest waiting chunk, the rest queueing) join the memory; other rows keep their state as it is."""
        mem, run = self.memory, self.running
        joining = run
        if delay:
            wait = self.waiting
            joining = map_slots(lambda t: t[:, :selections], wait)  # the oldest waiting chunk (views)
            queued = map_slots(lambda t, r: torch.cat([t[:, selections:], r], dim=1), wait, run)
        # The merge happens in boundary rows only; the others keep their memory as it is.
        merged = merge_slots(
            mem, joining, capacity, chunk_size=chunk_size, decay=decay, doc_start=doc_start, rows=boundary
        )
        if delay:  # after the merge: storing overwrites the tensors ``joining`` views
            cell = boundary[..., None]  # [rows, 1, 1] for keys and values, [rows, 1] for the rest

            def shifted(a, b):
                return torch.where(cell if a.dim() == 3 else boundary, a, b)

            self._store(wait, map_slots(shifted, queued, wait))
        self._store(mem, merged)
