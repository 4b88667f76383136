"""Tensor parallelism and ZeRO-1 inside ``bmojo train`` (``--tp N``, ``--zero1``): the model, the optimizer and the
checkpoints of a tp x dp job; ``bmojo.training`` runs the same loop around them.

Layout (``tensor_parallel.parallel_context``): tp-major, ranks ``[k*tp, (k+1)*tp)`` form tensor-parallel group
``k``; ranks with the same tensor-parallel rank form a data-parallel group. Every rank builds the full model from
the same seed and keeps its shard (``shard_model``), so the tensor-parallel ranks of a group start from the slices
of one model. Data, micro-batches, the reported loss and the evaluation are split over the data-parallel ranks
(``bmojo.training`` passes it a ``Processes`` view of the dp group); the gradients are averaged over the dp group
only (DDP on ``dp_group``). Replicated parameters (embeddings, LM head, RMSNorms, row-parallel biases) need no
tensor-parallel reduction: the column-parallel layers' backward all-reduces the gradient of their input (Megatron's
``f``), so every rank of a group computes the same, complete gradient for them. Clipping uses the norm of the full
model's gradient (``tensor_parallel.clip_grad_norm_``: sharded squares summed over the group, replicated ones
counted once). ZeRO-1 shards the AdamW state over the dp group (``torch.distributed.optim.
ZeroRedundancyOptimizer``); its update is AdamW's.

A checkpoint ``step_XXXXXX/`` of such a run holds ``config.json`` (the full model's), ``model-tp{r}-of-{N}.safetensors``
(written by the dp-rank-0 process of tensor-parallel rank ``r``; ``model.safetensors`` when ``N == 1``),
``training_state-rank{g}-of-{W}.safetensors`` (process ``g``'s AdamW state under the full model's parameter names,
sliced like its parameters, and its RNG state), ``training_state.json`` (step, tokens, the layout) and
``checksums.sha256``. The last checkpoint of a run also holds the merged ``model.safetensors``
(``from_pretrained`` loads it). All processes write into one temporary directory, which the main process renames
into place once every file is there: a checkpoint is complete or absent. ``--resume`` at any TP degree, data-parallel
size or ZeRO setting merges the saved shards by the plan's rules and splits them for the new layout
(``plan.merge_state_dicts`` / ``split_state_dict``: exact slicing), model and AdamW moments alike.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from .. import checkpoint as ckpt
from ..errors import BMojoError
from ..modeling_bmojo import BMojoForCausalLM
from .convert import FULL, _storable, rank_state_dict, shard_file
from .plan import merge_state_dicts, split_state_dict
from .tensor_parallel import ParallelContext, shard_model, zero1_optimizer

_RANK_STATE = re.compile(r"training_state-rank(\d+)-of-(\d+)\.safetensors")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def rank_state_file(rank: int, world: int) -> str:
    return f"training_state-rank{rank}-of-{world}.safetensors"


def is_parallel_checkpoint(checkpoint: Path) -> bool:
    """Whether ``checkpoint`` was written by a ``--tp``/``--zero1`` run (per-rank training state)."""
    return any(_RANK_STATE.fullmatch(p.name) for p in checkpoint.iterdir())


def _pad_rows(tensor: torch.Tensor, parts: int) -> torch.Tensor:
    """``tensor`` with zero rows appended along dim 0 up to a multiple of ``parts`` (ZeRO-1's padding)."""
    extra = -tensor.size(0) % parts
    return torch.cat([tensor, tensor.new_zeros(extra, *tensor.shape[1:])]) if extra else tensor


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# ---------------------------------------------------------------------------------------------------------------
# The model and the optimizer
# ---------------------------------------------------------------------------------------------------------------
def build_model(config, ctx: ParallelContext, seed: int, dtype: str, checkpoint: Path | None) -> BMojoForCausalLM:
    """This rank's shard of the model: the full model initialised from ``seed`` (the same on every rank), cut for
    ``ctx`` (gloo stand-in layers), then, when resuming, ``checkpoint``'s weights (any TP degree) for this rank."""
    torch.manual_seed(seed)
    model = BMojoForCausalLM(config).to(DTYPES[dtype])
    shard_model(model, ctx.tp_rank, ctx.tp_size, "torch", group=ctx.tp_group)
    if checkpoint is not None:
        ckpt.verify_checkpoint(checkpoint)
        try:
            state = rank_state_dict(checkpoint, ctx.tp_rank, ctx.tp_size)
        except (OSError, ValueError) as exc:
            raise BMojoError(f"cannot load the model in {checkpoint}: {exc}") from exc
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
        if missing or unexpected:
            raise BMojoError(
                f"the weights in {checkpoint} do not fit the model: missing {missing}, unexpected {unexpected}"
            )
    return model


def build_optimizer(groups: list[dict], ctx: ParallelContext, zero1: bool, lr: float, betas: tuple[float, float]):
    """AdamW over ``groups``; with ``zero1`` its state sharded over the data-parallel group."""
    if zero1:
        return zero1_optimizer(groups, ctx, torch.optim.AdamW, lr=lr, betas=betas)
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def _local(optimizer):
    """The optimizer that holds this rank's state (ZeRO's local AdamW, NxD's wrapped AdamW, or the AdamW itself)."""
    return getattr(optimizer, "optim", getattr(optimizer, "optimizer", optimizer))


def _row_shards(optimizer):
    """NxD's ZeRO-1 (``NeuronZero1Optimizer``, a torch-xla ``ZeroRedundancyOptimizer``) keeps, for every parameter,
    chunk ``local_rank`` of it padded along dim 0 to a multiple of ``local_world_size``, with its AdamW state, in
    ``base_optimizer``. Returns ``(zero, [(parameter, shard), ...])``, or ``None`` for any other optimizer."""
    zero = _local(optimizer)
    if not hasattr(zero, "base_optimizer"):
        return None
    pairs = [
        (p, s)
        for group, sharded in zip(zero.param_groups, zero.base_optimizer.param_groups, strict=True)
        for p, s in zip(group["params"], sharded["params"], strict=True)
    ]
    return zero, pairs


def _chunk_rows(rows: int, parts: int, index: int) -> int:
    """How many of a dim-0 chunk's rows are real (not padding): chunk ``index`` of ``rows`` padded to ``parts``."""
    size = -(-rows // parts)
    return max(0, min(rows, (index + 1) * size) - index * size)


def _optimizer_tensors(optimizer, names: dict[int, str]) -> dict[str, torch.Tensor]:
    """This rank's AdamW state under the full model's parameter names: ``optimizer.<name>.<kind>`` (the state of the
    rank's whole tensor-parallel shard), or for NxD's ZeRO-1 ``zero1.<name>.<kind>`` (its real rows of dim-0 chunk
    ``layout.dp_rank``; scalars such as ``step`` stay ``optimizer.``)."""
    rows = _row_shards(optimizer)
    if rows is None:
        return {
            f"optimizer.{names[id(p)]}.{key}": value.detach().cpu()
            for p, s in _local(optimizer).state.items()
            for key, value in s.items()
        }
    zero, pairs = rows
    tensors = {"layout.dp_rank": torch.tensor(zero.local_rank)}
    for p, shard in pairs:
        for key, value in zero.base_optimizer.state.get(shard, {}).items():
            if value.dim() == 0:
                tensors[f"optimizer.{names[id(p)]}.{key}"] = value.detach().cpu()
            else:
                real = _chunk_rows(p.size(0), zero.local_world_size, zero.local_rank)
                tensors[f"zero1.{names[id(p)]}.{key}"] = value.detach()[:real].cpu().contiguous()
    return tensors


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------
def save(out: Path, step: int, model, optimizer, ctx: ParallelContext, state: dict, keep: int, merged: bool) -> Path:
    """Every rank calls this (collective). Writes the checkpoint of ``step`` as the module docstring describes,
    atomically; ``merged`` adds the full ``model.safetensors``. Returns its path."""
    final = ckpt.checkpoint_path(out, step)
    root, tmp = final.parent, final.parent / f".tmp-{final.name}"
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    try:
        names = {id(p): n for n, p in model.named_parameters()}
        if ctx.dp_rank == 0:
            weights = _storable({k: v.detach().cpu() for k, v in model.state_dict().items()}, model.config)
            name = FULL if ctx.tp_size == 1 else shard_file(ctx.tp_rank, ctx.tp_size)
            save_file(weights, tmp / name, metadata={"format": "pt"})
        tensors = _optimizer_tensors(optimizer, names)
        tensors["rng.torch"] = torch.get_rng_state()
        tensors["layout.tp_rank"] = torch.tensor(ctx.tp_rank)  # groups need not be tp-major (NxD's are strided)
        save_file(tensors, tmp / rank_state_file(rank, world))
    except OSError as exc:
        raise BMojoError(f"cannot save the checkpoint {final}: {exc.strerror or exc}") from exc
    _barrier()
    if rank == 0:
        try:
            _commit(tmp, final, model.config, ctx, world, state, step, merged)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, OSError):
                raise BMojoError(f"cannot save the checkpoint {final}: {exc.strerror or exc}") from exc
            raise
        for old in ckpt.list_checkpoints(out)[:-keep]:
            shutil.rmtree(old)
    _barrier()
    return final


def _commit(tmp: Path, final: Path, config, ctx: ParallelContext, world: int, state: dict, step: int, merged: bool):
    config.save_pretrained(tmp)
    if merged and ctx.tp_size > 1:
        shards = [load_file(tmp / shard_file(r, ctx.tp_size)) for r in range(ctx.tp_size)]
        save_file(_storable(merge_state_dicts(shards, config), config), tmp / FULL, metadata={"format": "pt"})
    layout = {"tp": ctx.tp_size, "world": world}
    (tmp / ckpt.STATE_JSON).write_text(json.dumps({**state, "step": step, "layout": layout}, indent=2))
    ckpt.write_manifest(tmp)
    for f in tmp.iterdir():
        ckpt.fsync(f)
    ckpt.fsync(tmp)
    os.replace(tmp, final)  # the commit point
    ckpt.fsync(final.parent)


def _single_process_state(checkpoint: Path, model, optimizer) -> tuple[dict, list[dict], list[int]]:
    """A checkpoint of a run without ``--tp``/``--zero1`` (``checkpoint.py``'s format: AdamW state by parameter
    index) as one rank file keyed by parameter name. The indices follow ``make_optimizer``'s groups, whose order
    (by name) a sharded model and ZeRO-1's ``param_groups`` keep."""
    state, tensors = ckpt._read_training_state(checkpoint)
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    renamed = {"rng.torch": tensors.pop("rng.torch")}
    for key, value in tensors.items():
        _, index, kind = key.split(".", 2)
        renamed[f"optimizer.{order[int(index)]}.{kind}"] = value
    return {**state, "layout": {"tp": 1, "world": 1}}, [renamed], [0]


def load_training_state(checkpoint: Path, model, optimizer, ctx: ParallelContext) -> dict:
    """Restore this rank's AdamW state (from a checkpoint of any layout, or of a run without ``--tp``) and its
    RNG; return the JSON state."""
    try:
        if not is_parallel_checkpoint(checkpoint):
            state, files, tp_ranks = _single_process_state(checkpoint, model, optimizer)
        else:
            state = json.loads((checkpoint / ckpt.STATE_JSON).read_text())
            world = state["layout"]["world"]
            files = [load_file(checkpoint / rank_state_file(g, world)) for g in range(world)]
            tp_ranks = [int(tensors["layout.tp_rank"]) for tensors in files]
        old_tp, old_world = state["layout"]["tp"], state["layout"]["world"]
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise BMojoError(f"cannot read the training state in {checkpoint}: {exc!r}") from None
    # Each old tensor-parallel rank's state: the union over its data-parallel ranks (ZeRO-1 splits it among them).
    # NxD's ZeRO-1 files hold dim-0 chunks instead: concatenated in data-parallel order.
    per_tp: list[dict[str, dict[str, torch.Tensor]]] = [{} for _ in range(old_tp)]
    chunks: list[dict[tuple[str, str], list]] = [{} for _ in range(old_tp)]
    for tp_rank, tensors in zip(tp_ranks, files, strict=True):
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                pname, kind = key[len("optimizer.") :].rsplit(".", 1)
                per_tp[tp_rank].setdefault(kind, {}).setdefault(pname, value)
            elif key.startswith("zero1."):
                pname, kind = key[len("zero1.") :].rsplit(".", 1)
                chunks[tp_rank].setdefault((pname, kind), []).append((int(tensors["layout.dp_rank"]), value))
    for tp_rank, found in enumerate(chunks):
        for (pname, kind), parts in found.items():
            per_tp[tp_rank].setdefault(kind, {})[pname] = torch.cat([v for _, v in sorted(parts, key=lambda x: x[0])])
    config = model.config
    mine: dict[str, dict[str, torch.Tensor]] = {}
    try:
        for kind, values in per_tp[0].items():
            if all(t.dim() == 0 for t in values.values()):  # AdamW's step counts: one per parameter, any shard
                mine[kind] = values
                continue
            full = merge_state_dicts([shard[kind] for shard in per_tp], config)
            mine[kind] = split_state_dict(full, config, ctx.tp_size)[ctx.tp_rank]
    except (KeyError, ValueError) as exc:
        raise BMojoError(f"the optimizer state in {checkpoint} does not fit the model: {exc}") from exc
    names = {id(p): n for n, p in model.named_parameters()}
    local, rows = _local(optimizer), _row_shards(optimizer)
    pairs = rows[1] if rows else [(p, p) for group in local.param_groups for p in group["params"]]
    for p, holder in pairs:  # holder: the parameter, or NxD ZeRO-1's dim-0 shard of it
        name = names[id(p)]
        if any(name not in values for values in mine.values()):
            raise BMojoError(f"the optimizer state in {checkpoint} has nothing for {name}")
        adam = {}
        for kind, values in mine.items():
            value = values[name]
            if value.dim() > 0 and rows is not None:
                zero = rows[0]
                value = _pad_rows(value, zero.local_world_size).chunk(zero.local_world_size)[zero.local_rank]
            adam[kind] = value.clone() if kind == "step" else value.to(holder.device, holder.dtype).clone()
        (rows[0].base_optimizer if rows else local).state[holder] = adam
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.set_rng_state(files[rank if rank < old_world else 0]["rng.torch"])
    return state
