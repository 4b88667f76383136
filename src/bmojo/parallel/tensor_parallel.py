"""Tensor parallelism (Megatron style) for B'MOJO models: ``shard_model`` applies the declared plan
(``plan.py``: ``TP_PLAN`` and the per-parameter rules) with a backend (``backends.py``), and the pieces a
``torchrun`` training loop needs (process groups, clipping, ZeRO-1).

Heads, groups and key/value heads are contiguous blocks, so rank ``r``'s query heads read exactly its key/value
heads (GQA) and its SSM heads read exactly its ``B``/``C`` groups. The residual stream, the fading tokens (output
of the SSM's row-parallel ``out_proj``) and the loss are replicated on every rank. Modules read their local sizes
(heads, groups, channels) from their weights, so a sharded model runs the unchanged forward code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from ..errors import BMojoError
from ..modeling_bmojo import BMojoForCausalLM
from .backends import ColumnParallelLinear, NeuronBackend, RowParallelLinear, TorchBackend, resolve_backend
from .plan import (
    TP_PLAN,
    Split,
    check_tp_size,
    merge_state_dicts,
    parameter_rules,
    plan_style,
    split_state_dict,
)

__all__ = [
    "TP_PLAN",
    "ColumnParallelLinear",
    "NeuronBackend",
    "ParallelContext",
    "RowParallelLinear",
    "Split",
    "TorchBackend",
    "check_tp_size",
    "clip_grad_norm_",
    "merge_state_dicts",
    "parallel_context",
    "parameter_rules",
    "resolve_backend",
    "setup_tensor_parallel",
    "shard_model",
    "split_state_dict",
    "zero1_optimizer",
]


# ---------------------------------------------------------------------------------------------------------------
# Sharding a model in place, by the plan
# ---------------------------------------------------------------------------------------------------------------
def _mark_sharded(param: torch.Tensor, dim: int, size: int) -> None:
    # The attribute names neuronx-distributed (and Megatron) read, e.g. to count a sharded parameter once per
    # rank in the gradient norm; NxD's move to the device (preserve_parallel_attributes) reads all four.
    param.tensor_model_parallel = True
    param.partition_dim = dim
    param.partition_stride = 1
    param.num_partitions = size


def _parallel_linear(owner: nn.Linear, name: str, rules, rank: int, size: int, backend) -> nn.Module:
    split = rules[name + ".weight"]
    weight = split.local(owner.weight.detach(), rank, size)
    bias = None if owner.bias is None else owner.bias.detach()
    sizes = (owner.in_features, owner.out_features)
    if split.dim == 0:  # column-parallel: the bias is cut like the output rows
        bias = None if bias is None else rules[name + ".bias"].local(bias, rank, size)
        layer = backend.column_linear(weight, bias, *sizes)
    else:  # row-parallel: the bias is added after the sum, replicated
        layer = backend.row_linear(weight, bias, *sizes)
    _mark_sharded(layer.weight, split.dim, size)
    if split.dim == 0 and layer.bias is not None:
        _mark_sharded(layer.bias, 0, size)
    return layer


def _slice_parameters(owner: nn.Module, name: str, rules, rank: int, size: int) -> nn.Module:
    """Slice ``owner``'s own parameters; a depthwise conv is rebuilt at its local channel count."""
    local = {}
    for pname, param in owner.named_parameters(recurse=False):
        split = rules[f"{name}.{pname}"]
        local[pname] = nn.Parameter(split.local(param.detach(), rank, size), param.requires_grad)
        _mark_sharded(local[pname], split.dim, size)
    if isinstance(owner, nn.Conv1d):
        channels = local["weight"].shape[0]
        owner = nn.Conv1d(channels, channels, owner.kernel_size, groups=channels, bias=owner.bias is not None,
                          device="meta")
    for pname, param in local.items():
        setattr(owner, pname, param)
    return owner


def shard_model(model: BMojoForCausalLM, tp_rank: int, tp_size: int, backend="torch", group=None) -> BMojoForCausalLM:
    """Keep rank ``tp_rank``'s part of a full model, in place, and return it: every module named in ``TP_PLAN``
    is treated by its style.

    Sliced parameters keep their names, so ``model.state_dict()`` is this rank's entry of ``split_state_dict``.
    ``model.config`` still describes the full model. With ``tp_size == 1`` the model is returned unchanged.
    Decoding works after a parallel prefill (``use_cache=True``); ``BMojoCache.empty`` builds full-size states
    and does not fit a sharded model. Activation checkpointing (``gradient_checkpointing_enable``) is refused with
    tensor parallelism (untested: the recomputation would repeat the forward's collectives inside the backward), and
    so is selective recompute (``selective_recompute_enable``; untested).
    """
    config = model.config
    check_tp_size(config, tp_size)
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank must lie in [0, {tp_size}), got {tp_rank}")
    if getattr(model, "tensor_parallel", None) is not None:
        raise ValueError(f"the model is already sharded (rank, size) = {model.tensor_parallel}")
    if tp_size > 1 and any(getattr(m, "gradient_checkpointing", False) for m in model.modules()):
        raise ValueError(
            "gradient checkpointing is not supported with tensor parallelism: call "
            "model.gradient_checkpointing_disable() before shard_model"
        )
    if tp_size > 1 and any(getattr(m, "recompute_ops", None) for m in model.modules()):
        raise ValueError(
            "selective recompute is not supported with tensor parallelism: call "
            "model.selective_recompute_disable() before shard_model"
        )
    if tp_size == 1:
        return model
    backend = resolve_backend(backend, group)
    rules = parameter_rules(config)
    modules = dict(model.named_modules())
    unplanned = {n.rsplit(".", 1)[0] for n in rules} - {n for n in modules if plan_style(n)}
    if unplanned:  # the plan and the rules are two views of one table: they must not drift apart
        raise RuntimeError(f"sharding rules for modules that TP_PLAN does not name: {sorted(unplanned)}")
    for name, module in modules.items():
        style = plan_style(name)
        if style in ("colwise", "rowwise"):
            new = _parallel_linear(module, name, rules, tp_rank, tp_size, backend)
        elif style == "sliced":
            new = _slice_parameters(module, name, rules, tp_rank, tp_size)
        elif style == "sum_over_shards":
            module.bind(backend.sum_over_shards)
            continue
        elif style == "copy_to_shards":
            module.bind(backend.copy_to_shards)
            continue
        else:
            continue
        if new is not module:
            parent_name, _, attr = name.rpartition(".")
            setattr(modules[parent_name], attr, new)
    model.tensor_parallel = (tp_rank, tp_size)
    return model


# ---------------------------------------------------------------------------------------------------------------
# Integration point for a training loop (torchrun; bmojo.parallel.training wires it into bmojo train)
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class ParallelContext:
    tp_rank: int
    tp_size: int
    tp_group: object  # a torch.distributed group (None: the default group)
    dp_rank: int
    dp_size: int
    dp_group: object


def setup_tensor_parallel(model: BMojoForCausalLM, tp_size: int, backend="torch") -> ParallelContext:
    """Shard ``model`` for the current ``torch.distributed`` job and return the process groups.

    The ``world_size`` ranks form ``world_size / tp_size`` data-parallel replicas; ranks ``[k*tp, (k+1)*tp)``
    form tensor-parallel group ``k`` and ranks with the same ``tp_rank`` form a data-parallel group. Every rank
    must call this (group creation is collective). A training loop then averages gradients over ``dp_group``
    (e.g. ``DistributedDataParallel(model, process_group=ctx.dp_group)``), clips with ``clip_grad_norm_`` below
    and may shard the optimizer state with ``zero1_optimizer``. On trn1 use
    ``bmojo.parallel.neuron.NeuronTraining`` instead, which lets neuronx-distributed build the groups (groups made
    here with ``new_group`` would carry no replica-group mesh on the ``xla`` backend).
    """
    if not dist.is_initialized():
        raise BMojoError("setup_tensor_parallel needs torch.distributed.init_process_group() first")
    check_tp_size(model.config, tp_size)
    ctx = parallel_context(tp_size)
    shard_model(model, ctx.tp_rank, tp_size, backend, group=ctx.tp_group)
    return ctx


def parallel_context(tp_size: int) -> ParallelContext:
    """The tp x dp layout of the current job, tp-major: ranks ``[k*tp, (k+1)*tp)`` form tensor-parallel group
    ``k`` (``dp_rank = rank // tp``), ranks with the same ``tp_rank = rank % tp`` form a data-parallel group.
    Collective (every rank must call it). Without an initialised process group: one process,
    ``ParallelContext(0, 1, None, 0, 1, None)`` (``tp_size`` must then be 1)."""
    if not dist.is_initialized():
        if tp_size != 1:
            raise BMojoError(f"tensor-parallel size {tp_size} needs torch.distributed.init_process_group() first")
        return ParallelContext(0, 1, None, 0, 1, None)
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % tp_size:
        raise ValueError(f"world size {world} is not a multiple of the tensor-parallel size {tp_size}")
    tp_groups = [dist.new_group(list(range(k * tp_size, (k + 1) * tp_size))) for k in range(world // tp_size)]
    dp_groups = [dist.new_group(list(range(r, world, tp_size))) for r in range(tp_size)]
    tp_rank, dp_rank = rank % tp_size, rank // tp_size
    return ParallelContext(tp_rank, tp_size, tp_groups[dp_rank], dp_rank, world // tp_size, dp_groups[tp_rank])


def clip_grad_norm_(parameters, max_norm: float, ctx: ParallelContext | None = None) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` (2-norm) for a sharded model: sharded gradients count on every rank,
    replicated ones once. Returns the total norm of the full model's gradient."""
    grads = [p for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    sharded = sum(p.grad.pow(2).sum() for p in grads if getattr(p, "tensor_model_parallel", False))
    replicated = sum(p.grad.pow(2).sum() for p in grads if not getattr(p, "tensor_model_parallel", False))
    sharded = torch.as_tensor(sharded, dtype=grads[0].grad.dtype)
    if ctx is not None and ctx.tp_size > 1:
        dist.all_reduce(sharded, group=ctx.tp_group)
    total = (sharded + replicated).sqrt()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for p in grads:
        p.grad.mul_(scale.to(p.grad.dtype))
    return total


def zero1_optimizer(parameters, ctx: ParallelContext, optimizer_class=torch.optim.AdamW, **kwargs):
    """ZeRO-1 on the CPU stand-in: optimizer states sharded over the data-parallel group
    (``torch.distributed.optim.ZeroRedundancyOptimizer``); the update equals ``optimizer_class``'s."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return ZeroRedundancyOptimizer(parameters, optimizer_class=optimizer_class, process_group=ctx.dp_group, **kwargs)
