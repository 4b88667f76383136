"""The eidetic memory: the innovation score, per-chunk selection, retention, and the memory's decoding state.

Source: Zancato et al., "B'MOJO: Hybrid State Space Realizations of Foundation Models with Eidetic and Fading
Memory" (NeurIPS 2024), Sec. 3: a token is worth remembering verbatim when the SSM's state could not predict it.
Here the *innovation score* of token ``t`` is the squared error of predicting its key from the previous fading
token ``f_{t-1}`` (a learned linear predictor, trained by an auxiliary loss). The policy (top-k per chunk, a
fixed-size memory keeping the best scores, visibility once a token left the window) is stated in
``ops/selection/chunk.py``; its forms live there, the memory type ``EideticMemory`` in ``ops/selection/common.py``.

Under tensor parallelism each rank holds some key heads, so the score's sum over key features is split over the
ranks: it passes through ``PartialSum``, the hook point that the sharding plan binds to an all-reduce.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..ops import dispatch
from ..ops.selection import INVALID_SCORE, EideticMemory, empty_slots, merge_slots
from .common import InferenceState, where_rows


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


def innovation_error(predictor: nn.Module, partial_sum: PartialSum, f_prev, k, key_features: int) -> torch.Tensor:
    """Innovation score ``[...]``: mean squared error of predicting the key ``k [..., Hkv, D]`` from the previous
    fading token ``f_prev [..., d]``, averaged over all ``key_features`` (global, also when sharded).

    Inputs are detached: the auxiliary loss trains the predictor only, and no gradient flows through the (hard)
    selection."""
    pred = predictor(f_prev.detach())
    return partial_sum((pred - k.detach().flatten(-2)).pow(2).sum(-1)) / key_features


def innovation_loss(err: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """The auxiliary loss: mean of ``err [B, L]`` over real tokens."""
    return err.mean() if valid is None else (err * valid).sum() / valid.sum().clamp_min(1)


def selection_scores(err: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Scores the selection ranks by: ``err`` detached, float32, ``INVALID_SCORE`` at padding."""
    scores = err.detach().float()
    return scores if valid is None else scores.masked_fill(~valid, INVALID_SCORE)


def select(scores, k, v, chunk_size: int, selections: int, capacity: int) -> tuple[EideticMemory, EideticMemory]:
    """Per-chunk selection and retention over a sequence (``k, v [B, L, Hkv, D]``): ``(picks, seen)`` as in
    ``ops.selection.select_per_chunk``, with ``seen``'s keys and values in heads ``[B, nC, M, Hkv, D]``."""
    heads = k.shape[-2:]
    picks, seen = dispatch("eidetic_selection")(scores, k.flatten(-2), v.flatten(-2), chunk_size, selections, capacity)
    return picks, seen._replace(k=seen.k.unflatten(-1, heads), v=seen.v.unflatten(-1, heads))


@dataclass
class EideticState(InferenceState):
    """The memory's decoding state: ``mem_* [B, M, ...]`` the memory (keys, values, positions, scores),
    ``run_* [B, k_sel, ...]`` the current chunk's best candidates so far, ``prev_f [B, d]`` the last fading token
    (input of the innovation predictor). Keys and values are flattened over heads (``F = Hkv * D``)."""

    mem_k: torch.Tensor | None = None
    mem_v: torch.Tensor | None = None
    mem_pos: torch.Tensor | None = None
    mem_score: torch.Tensor | None = None
    run_k: torch.Tensor | None = None
    run_v: torch.Tensor | None = None
    run_pos: torch.Tensor | None = None
    run_score: torch.Tensor | None = None
    prev_f: torch.Tensor | None = None

    @property
    def memory(self) -> EideticMemory:
        return EideticMemory(self.mem_k, self.mem_v, self.mem_pos, self.mem_score)

    @property
    def running(self) -> EideticMemory:
        return EideticMemory(self.run_k, self.run_v, self.run_pos, self.run_score)

    def _store(self, prefix: str, slots: EideticMemory) -> None:
        for name, t in zip(EideticMemory._fields, slots):
            if t is not None:  # a None field (bias) is absent
                getattr(self, f"{prefix}_{name}").copy_(t)

    @classmethod
    def allocate(cls, config, batch_size: int, device=None, dtype=torch.float32) -> "EideticState":
        features = config.num_key_value_heads * config.head_dim
        mem = empty_slots(batch_size, config.memory_size, features, device=device, dtype=dtype)
        run = empty_slots(batch_size, config.selections_per_chunk, features, device=device, dtype=dtype)
        prev_f = torch.zeros(batch_size, config.hidden_size, device=device, dtype=dtype)
        return cls(*mem[:4], *run[:4], prev_f)  # k, v, pos, score: empty slots have no bias

    @classmethod
    def from_prefill(cls, picks: EideticMemory, seen: EideticMemory, f, lengths, chunk_size: int) -> "EideticState":
        """The state after each row's last token (``lengths [B]``): the memory and picks of that token's chunk."""
        current = ((lengths - 1) // chunk_size)[:, None]  # chunk of each row's last token

        def at_chunk(field):
            field = field.flatten(3) if field.dim() > 4 else field  # keys/values in heads -> features
            idx = current.view(-1, *([1] * (field.dim() - 1))).expand(-1, 1, *field.shape[2:])
            return torch.gather(field, 1, idx)[:, 0]

        idx = (lengths - 1)[:, None, None].expand(-1, 1, f.shape[-1])
        prev_f = torch.gather(f, 1, idx)[:, 0].clone()
        mem = [at_chunk(f) for f in seen if f is not None]  # a None field (bias) is absent
        run = [at_chunk(f) for f in picks if f is not None]
        return cls(*mem, *run, prev_f)

    def step(self, k, v, score, f, positions, chunk_size: int, selections: int, capacity: int) -> EideticMemory:
        """Token at ``positions [B, 1]`` with key/value ``k, v [B, Hkv, D]``, innovation ``score [B]`` and fading
        token ``f [B, d]``: updates the state in place and returns the memory its query sees (``[B, M, Hkv, D]``).

        At a chunk boundary the finished chunk's picks join the memory first; then the token competes for the
        current chunk's picks."""
        boundary = (torch.remainder(positions, chunk_size) == 0) & (positions > 0)  # [B, 1]
        mem, run = self.memory, self.running
        merged = merge_slots(mem, run, capacity)
        fresh = empty_slots(k.shape[0], selections, run.k.shape[-1], device=k.device, dtype=run.k.dtype)
        def pick(a, b):  # a None field (bias) is absent
            return None if a is None else where_rows(boundary, a, b)

        self._store("mem", EideticMemory(*(pick(a, b) for a, b in zip(merged, mem))))
        run = EideticMemory(*(pick(a, b) for a, b in zip(fresh, run)))
        new = EideticMemory(k.flatten(-2)[:, None], v.flatten(-2)[:, None], positions, score[:, None])
        self._store("run", merge_slots(run, new, selections))
        self.prev_f.copy_(f)
        heads = k.shape[-2:]
        return self.memory._replace(k=self.mem_k.unflatten(-1, heads), v=self.mem_v.unflatten(-1, heads))
