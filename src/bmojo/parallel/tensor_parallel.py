"""Tensor parallelism (Megatron style) for B'MOJO models, with one set of sharding rules.

The rules say, for every parameter of a full ``BMojoForCausalLM``, which rows or columns each of ``tp`` ranks
keeps (``parameter_rules``). The same table

* shards a full model in place (``shard_model``): sliced parameters, column-/row-parallel linears, local sizes;
* splits and merges checkpoints and gradients (``split_state_dict`` / ``merge_state_dicts``).

| module | parameter | split | rank ``r`` of ``tp`` keeps |
|---|---|---|---|
| attention | ``q_proj.weight`` | rows (column-parallel) | query heads ``[r*Hq/tp, (r+1)*Hq/tp)`` |
| attention | ``k_proj``, ``v_proj`` ``.weight`` | rows (column-parallel) | key/value heads ``[r*Hkv/tp, ...)`` |
| attention | ``innovation_predictor.weight/.bias`` | rows (column-parallel) | the same key heads |
| attention | ``o_proj.weight`` | columns (row-parallel) | its query heads' inputs |
| SSM | ``in_proj.weight`` | rows, per segment ``[z, x, B, C, dt]`` | its part of z and x; its groups' B, C; its heads' dt |
| SSM | ``conv1d.weight/.bias`` | channels, per segment ``[x, B, C]`` | the channels matching ``in_proj`` |
| SSM | ``A_log``, ``D``, ``dt_bias`` | by head | its SSM heads |
| SSM | ``norm.weight`` (gated) | by group | its groups (the norm is per group: no cross-rank statistics) |
| SSM | ``out_proj.weight`` | columns (row-parallel) | its heads' inputs |
| MLP | ``gate_proj``, ``up_proj`` ``.weight`` | rows (column-parallel) | ``intermediate_size/tp`` units |
| MLP | ``down_proj.weight`` | columns (row-parallel) | the same units |
| — | embeddings, LM head, RMSNorms | replicated | everything |

Heads, groups and key/value heads are contiguous blocks, so rank ``r``'s query heads read exactly its key/value
heads (GQA) and its SSM heads read exactly its ``B``/``C`` groups. Column-parallel layers are the identity on
their input in the forward and all-reduce the input's gradient in the backward (Megatron's ``f``); row-parallel
layers all-reduce their output in the forward and pass the gradient through (``g``). The residual stream, the
fading tokens (output of the SSM's row-parallel ``out_proj``) and the loss are therefore replicated on every rank.

The innovation score sums the squared prediction error over every key feature; each rank holds some key heads, so
``BMojoAttention.sum_over_shards`` becomes a ``g`` all-reduce: the score is identical on every rank (hence the
same eidetic selection, and memory slots holding the rank's own key/value heads), and since the loss is replicated
rather than summed over ranks, the backward is the identity: each rank's predictor shard gets exactly the
gradient it has in the full model. (``torch.distributed.nn.functional.all_reduce`` all-reduces the gradient as
well, which would scale it by ``tp``; hence the small autograd functions below.)

Backends: ``"torch"`` runs on ``torch.distributed`` (gloo on CPU: the stand-in that the tests run);
``"neuron"`` uses neuronx-distributed's ``ColumnParallelLinear`` / ``RowParallelLinear`` on trn1
(``bmojo.parallel.neuron``; not runnable without the Neuron SDK).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..configuration_bmojo import BMojoConfig
from ..errors import BMojoError
from ..modeling_bmojo import BMojoAttention, BMojoForCausalLM, BMojoSSM


# ---------------------------------------------------------------------------------------------------------------
# Sharding rules
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Split:
    """Along ``dim`` a parameter is the concatenation of ``segments`` (global sizes); rank ``r`` keeps the
    ``r``-th equal part of every segment, concatenated in the same order."""

    dim: int
    segments: tuple[int, ...]

    def local(self, tensor: torch.Tensor, rank: int, size: int) -> torch.Tensor:
        parts = [p.chunk(size, self.dim)[rank] for p in tensor.split(self.segments, dim=self.dim)]
        return torch.cat(parts, self.dim).contiguous()

    def merge(self, shards: list[torch.Tensor]) -> torch.Tensor:
        local_sizes = [s // len(shards) for s in self.segments]
        per_rank = [t.split(local_sizes, dim=self.dim) for t in shards]
        segments = [torch.cat(parts, self.dim) for parts in zip(*per_rank)]
        return torch.cat(segments, self.dim)


def _column(size: int) -> Split:
    return Split(0, (size,))


def _row(size: int) -> Split:
    return Split(1, (size,))


def attention_rules(config: BMojoConfig, layer_type: str) -> dict[str, Split]:
    """Rules of a ``BMojoAttention`` (names relative to the module); its own SSM is not included."""
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    rules = {
        "q_proj.weight": _column(q),
        "k_proj.weight": _column(kv),
        "v_proj.weight": _column(kv),
        "o_proj.weight": _row(q),
    }
    if layer_type == "bmojo" and config.eidetic:
        rules["innovation_predictor.weight"] = _column(kv)
        rules["innovation_predictor.bias"] = _column(kv)
    return rules


def ssm_rules(config: BMojoConfig) -> dict[str, Split]:
    """Rules of a ``BMojoSSM`` (names relative to the module)."""
    inner, heads = config.ssm_inner_size, config.ssm_num_heads
    bc = config.ssm_ngroups * config.ssm_state_size
    conv = Split(0, (inner, bc, bc))  # conv channels are [x, B, C]
    return {
        "in_proj.weight": Split(0, (inner, inner, bc, bc, heads)),  # rows are [z, x, B, C, dt]
        "conv1d.weight": conv,
        "conv1d.bias": conv,
        "dt_bias": _column(heads),
        "A_log": _column(heads),
        "D": _column(heads),
        "norm.weight": _column(inner),  # heads and norm groups are both contiguous channel blocks
        "out_proj.weight": _row(inner),
    }


def mlp_rules(config: BMojoConfig) -> dict[str, Split]:
    """Rules of a ``BMojoMLP`` (names relative to the module)."""
    width = config.intermediate_size
    return {"gate_proj.weight": _column(width), "up_proj.weight": _column(width), "down_proj.weight": _row(width)}


def parameter_rules(config: BMojoConfig) -> dict[str, Split]:
    """Every sharded parameter of ``BMojoForCausalLM(config)`` by its full name; parameters not listed
    (embeddings, LM head, RMSNorms) are replicated."""
    rules: dict[str, Split] = {}

    def add(prefix, table):
        rules.update({prefix + name: split for name, split in table.items()})

    for i, layer_type in enumerate(config.layers_block_type):
        mixer = f"model.layers.{i}.mixer."
        if layer_type == "ssm":
            add(mixer, ssm_rules(config))
        else:
            add(mixer, attention_rules(config, layer_type))
            if config.layer_has_ssm(layer_type):
                add(mixer + "ssm.", ssm_rules(config))
        if config.use_mlp:
            add(f"model.layers.{i}.mlp.", mlp_rules(config))
    return rules


def check_tp_size(config: BMojoConfig, tp_size: int) -> None:
    """Raise ``ValueError`` naming the config field that ``tp_size`` does not divide (only fields in use count)."""
    if not isinstance(tp_size, int) or isinstance(tp_size, bool) or tp_size < 1:
        raise ValueError(f"tp_size must be a positive integer, got {tp_size!r}")
    fields = {}
    if any(t != "ssm" for t in config.layers_block_type):
        fields["num_attention_heads"] = config.num_attention_heads
        fields["num_key_value_heads"] = config.num_key_value_heads
    if any(config.layer_has_ssm(t) for t in config.layers_block_type):
        fields["ssm_num_heads (ssm_expand * hidden_size / ssm_head_dim)"] = config.ssm_num_heads
        fields["ssm_ngroups"] = config.ssm_ngroups
    if config.use_mlp:
        fields["intermediate_size"] = config.intermediate_size
    for name, value in fields.items():
        if value % tp_size:
            raise ValueError(f"{name} ({value}) must be divisible by the tensor-parallel size ({tp_size})")


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint / gradient conversion (pure tensor functions)
# ---------------------------------------------------------------------------------------------------------------
def split_state_dict(full: dict[str, torch.Tensor], config: BMojoConfig, tp_size: int) -> list[dict[str, torch.Tensor]]:
    """A full state dict -> one state dict per rank, with the same keys (replicated tensors are shared)."""
    check_tp_size(config, tp_size)
    rules = parameter_rules(config)
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(tp_size)]
    for name, tensor in full.items():
        split = rules.get(name)
        if split is not None and tensor.shape[split.dim] != sum(split.segments):
            expected = sum(split.segments)
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {expected} along dim {split.dim}")
        for rank in range(tp_size):
            shards[rank][name] = tensor if split is None else split.local(tensor, rank, tp_size)
    return shards


def merge_state_dicts(shards: list[dict[str, torch.Tensor]], config: BMojoConfig) -> dict[str, torch.Tensor]:
    """Per-rank state dicts (rank order) -> the full state dict. Replicated tensors must agree on every rank."""
    tp_size = len(shards)
    check_tp_size(config, tp_size)
    keys = list(shards[0])
    for rank, shard in enumerate(shards):
        if set(shard) != set(keys):
            odd = sorted(set(shard) ^ set(keys))
            raise ValueError(f"the state dicts of rank 0 and rank {rank} differ in keys {odd}")
    rules = parameter_rules(config)
    full = {}
    for name in keys:
        tensors = [shard[name] for shard in shards]
        split = rules.get(name)
        if split is None:
            if any(not torch.equal(tensors[0], t) for t in tensors[1:]):
                raise ValueError(f"replicated tensor {name} differs between ranks")
            full[name] = tensors[0]
        else:
            full[name] = split.merge(tensors)
    return full


# ---------------------------------------------------------------------------------------------------------------
# torch.distributed backend (the CPU stand-in; any process group works)
# ---------------------------------------------------------------------------------------------------------------
class _CopyToShards(torch.autograd.Function):
    """Megatron's ``f``: identity forward; the backward sums the input gradient over the ranks."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _SumOverShards(torch.autograd.Function):
    """Megatron's ``g``: the forward sums over the ranks; the backward is the identity, because every rank
    computes the same (replicated) loss from the sum."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class ColumnParallelLinear(nn.Module):
    """Holds output rows ``weight [out/tp, in]`` (and their bias) of a full linear layer; output stays sharded."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group=None):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias) if bias is not None else None
        self.group = group
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(_CopyToShards.apply(x, self.group), self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """Holds input columns ``weight [out, in/tp]`` of a full linear layer; sums the partial outputs over ranks,
    then adds the (replicated) bias."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group=None):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias) if bias is not None else None
        self.group = group
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _SumOverShards.apply(F.linear(x, self.weight), self.group)
        return out if self.bias is None else out + self.bias


class TorchBackend:
    """Collectives of ``torch.distributed`` over ``group`` (``None``: the default group)."""

    name = "torch"

    def __init__(self, group=None):
        if not dist.is_available() or not dist.is_initialized():
            raise BMojoError("the 'torch' tensor-parallel backend needs torch.distributed.init_process_group() first")
        self.group = group

    def rank_and_size(self) -> tuple[int, int]:
        return dist.get_rank(self.group), dist.get_world_size(self.group)

    def column_linear(self, weight, bias, in_features: int, out_features: int) -> nn.Module:
        return ColumnParallelLinear(weight, bias, self.group)

    def row_linear(self, weight, bias, in_features: int, out_features: int) -> nn.Module:
        return RowParallelLinear(weight, bias, self.group)

    def sum_over_shards(self, x: torch.Tensor) -> torch.Tensor:
        return _SumOverShards.apply(x, self.group)


def resolve_backend(backend="torch", group=None):
    """``"torch"`` (torch.distributed over ``group``), ``"neuron"`` (neuronx-distributed; raises ``BMojoError``
    when it does not import), ``"auto"`` (neuron when it imports, else torch), or a backend object."""
    if not isinstance(backend, str):
        return backend
    if backend == "auto":
        from .neuron import neuron_available

        backend = "neuron" if neuron_available() else "torch"
    if backend == "torch":
        return TorchBackend(group)
    if backend == "neuron":
        from .neuron import NeuronBackend

        return NeuronBackend()
    raise ValueError(f"unknown tensor-parallel backend {backend!r}; choose 'torch', 'neuron' or 'auto'")


# ---------------------------------------------------------------------------------------------------------------
# Sharding a model in place
# ---------------------------------------------------------------------------------------------------------------
def _mark_sharded(param: torch.Tensor, dim: int) -> None:
    # The attribute names neuronx-distributed (and Megatron) read, e.g. to count a sharded parameter once per
    # rank in the gradient norm.
    param.tensor_model_parallel = True
    param.partition_dim = dim
    param.partition_stride = 1


def _localize_sizes(module: nn.Module, tp_size: int, backend) -> None:
    """Make the unchanged forward code run on the local shard."""
    if isinstance(module, BMojoAttention):
        module.num_heads //= tp_size
        module.num_kv //= tp_size
        if module.use_eidetic:
            module.sum_over_shards = backend.sum_over_shards  # key_features stays the global count
    elif isinstance(module, BMojoSSM):
        module.inner //= tp_size
        module.heads //= tp_size
        module.groups //= tp_size
        module.conv_dim = module.inner + 2 * module.groups * module.state_size
        module.norm.groups //= tp_size
        conv = module.conv1d
        conv.in_channels = conv.out_channels = conv.groups = module.conv_dim


def shard_model(model: BMojoForCausalLM, tp_rank: int, tp_size: int, backend="torch", group=None) -> BMojoForCausalLM:
    """Keep rank ``tp_rank``'s part of a full model, in place, and return it.

    Sliced parameters keep their names, so ``model.state_dict()`` is this rank's entry of ``split_state_dict``.
    ``model.config`` still describes the full model. With ``tp_size == 1`` the model is returned unchanged.
    Decoding works after a parallel prefill (``use_cache=True``); ``BMojoCache.empty`` builds full-size states
    and does not fit a sharded model.
    """
    config = model.config
    check_tp_size(config, tp_size)
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank must lie in [0, {tp_size}), got {tp_rank}")
    if getattr(model, "tensor_parallel", None) is not None:
        raise ValueError(f"the model is already sharded (rank, size) = {model.tensor_parallel}")
    if tp_size == 1:
        return model
    backend = resolve_backend(backend, group)
    rules = parameter_rules(config)
    modules = dict(model.named_modules())
    for owner_name in sorted({name.rsplit(".", 1)[0] for name in rules}):
        owner = modules[owner_name]
        if isinstance(owner, nn.Linear):
            split = rules[owner_name + ".weight"]
            weight = split.local(owner.weight.detach(), tp_rank, tp_size)
            bias = None if owner.bias is None else owner.bias.detach()
            sizes = (owner.in_features, owner.out_features)
            if split.dim == 0:  # column-parallel: the bias is cut like the output rows
                bias = None if bias is None else rules[owner_name + ".bias"].local(bias, tp_rank, tp_size)
                layer = backend.column_linear(weight, bias, *sizes)
            else:  # row-parallel: the bias is added after the sum, replicated
                layer = backend.row_linear(weight, bias, *sizes)
            _mark_sharded(layer.weight, split.dim)
            if split.dim == 0 and layer.bias is not None:
                _mark_sharded(layer.bias, 0)
            parent_name, _, attr = owner_name.rpartition(".")
            setattr(modules[parent_name], attr, layer)
        else:  # conv, per-head vectors, gated-norm weight: slice in place
            for pname, param in list(owner.named_parameters(recurse=False)):
                split = rules[f"{owner_name}.{pname}"]
                local = nn.Parameter(split.local(param.detach(), tp_rank, tp_size), param.requires_grad)
                _mark_sharded(local, split.dim)
                setattr(owner, pname, local)
    for module in model.modules():
        _localize_sizes(module, tp_size, backend)
    model.tensor_parallel = (tp_rank, tp_size)
    return model


# ---------------------------------------------------------------------------------------------------------------
# Integration point for a training loop (torchrun; not wired into training.py)
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
    ``bmojo.parallel.neuron.initialize_neuron_training`` instead, which lets neuronx-distributed build the groups.
    """
    if not dist.is_initialized():
        raise BMojoError("setup_tensor_parallel needs torch.distributed.init_process_group() first")
    world, rank = dist.get_world_size(), dist.get_rank()
    check_tp_size(model.config, tp_size)
    if world % tp_size:
        raise ValueError(f"world size {world} is not a multiple of the tensor-parallel size {tp_size}")
    tp_groups = [dist.new_group(list(range(k * tp_size, (k + 1) * tp_size))) for k in range(world // tp_size)]
    dp_groups = [dist.new_group(list(range(r, world, tp_size))) for r in range(tp_size)]
    tp_rank, dp_rank = rank % tp_size, rank // tp_size
    ctx = ParallelContext(tp_rank, tp_size, tp_groups[dp_rank], dp_rank, world // tp_size, dp_groups[tp_rank])
    shard_model(model, ctx.tp_rank, tp_size, backend, group=ctx.tp_group)
    return ctx


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
