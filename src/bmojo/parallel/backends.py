"""Tensor-parallel backends: the collectives and parallel linear layers ``shard_model`` builds with.

* ``"torch"``: ``torch.distributed`` (gloo on CPU: the stand-in that the tests run). Column-parallel layers are the
  identity on their input in the forward and all-reduce the input's gradient in the backward (Megatron's ``f``);
  row-parallel layers all-reduce their output in the forward and pass the gradient through (``g``).
* ``"neuron"``: neuronx-distributed's ``ColumnParallelLinear`` / ``RowParallelLinear`` on trn1. NOT RUN:
  neuronx-distributed imports only inside the Neuron SDK (torch-neuronx, torch-xla, neuronx-cc; SDK 2.28 + torch 2.9
  for trn1 training); the PyPI package of that name is a placeholder. Nothing here imports it at module load; the
  backend imports it when built and raises ``BMojoError`` when it is missing.

A backend offers ``rank_and_size()``, ``column_linear``, ``row_linear``, ``sum_over_shards`` (forward all-reduce,
identity backward: ``torch.distributed.nn.functional.all_reduce`` all-reduces the gradient as well, which would
scale it by ``tp``; hence the small autograd functions below) and ``copy_to_shards`` (identity forward, backward
all-reduce).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..errors import BMojoError


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

    def copy_to_shards(self, x: torch.Tensor) -> torch.Tensor:
        return _CopyToShards.apply(x, self.group)



_HINT = (
    "neuronx_distributed does not import here; the 'neuron' tensor-parallel backend needs the AWS Neuron SDK "
    "(trn1: SDK 2.28, torch 2.9, "
    "`pip install neuronx-distributed --extra-index-url https://pip.repos.neuron.amazonaws.com`); "
    "use backend='torch' (torch.distributed) elsewhere"
)


def _import_nxd():
    try:
        import neuronx_distributed as nxd
        from neuronx_distributed.parallel_layers import layers, mappings, parallel_state
    except Exception as exc:  # the package raises more than ImportError when the SDK is half present
        raise BMojoError(f"{_HINT} ({type(exc).__name__}: {exc})") from exc
    return nxd, layers, mappings, parallel_state


def neuron_available() -> bool:
    """Whether neuronx-distributed imports (only on a Neuron SDK install)."""
    try:
        _import_nxd()
    except BMojoError:
        return False
    return True


class NeuronBackend:
    """NxD layers with the same slices as the stand-in. The NxD layer is built with the full sizes (it divides
    them by the TP degree itself) and then receives the rank's slice of the pretrained weight, so that a model
    sharded here computes what the full model computes. Needs ``parallel_state`` initialised (NxD's
    ``initialize_parallel_model`` does it before calling the model function)."""

    name = "neuron"

    def __init__(self):
        _, self.layers, self.mappings, self.parallel_state = _import_nxd()

    def rank_and_size(self) -> tuple[int, int]:
        ps = self.parallel_state
        return ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_size()

    def _fill(self, layer, weight, bias):
        with torch.no_grad():
            layer.weight.copy_(weight)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def column_linear(self, weight, bias, in_features: int, out_features: int):
        layer = self.layers.ColumnParallelLinear(
            in_features, out_features, bias=bias is not None, gather_output=False,
            dtype=weight.dtype, device=weight.device,
        )
        return self._fill(layer, weight, bias)

    def row_linear(self, weight, bias, in_features: int, out_features: int):
        layer = self.layers.RowParallelLinear(
            in_features, out_features, bias=bias is not None, input_is_parallel=True,
            dtype=weight.dtype, device=weight.device,
        )
        return self._fill(layer, weight, bias)

    def sum_over_shards(self, x: torch.Tensor) -> torch.Tensor:
        # Forward all-reduce, backward identity: Megatron's g, as in the stand-in.
        return self.mappings.reduce_from_tensor_model_parallel_region(x)

    def copy_to_shards(self, x: torch.Tensor) -> torch.Tensor:
        # Forward identity, backward all-reduce: Megatron's f, as in the stand-in.
        return self.mappings.copy_to_tensor_model_parallel_region(x)


def resolve_backend(backend="torch", group=None):
    """``"torch"`` (torch.distributed over ``group``), ``"neuron"`` (neuronx-distributed; raises ``BMojoError``
    when it does not import), ``"auto"`` (neuron when it imports, else torch), or a backend object."""
    if not isinstance(backend, str):
        return backend
    if backend == "auto":
        backend = "neuron" if neuron_available() else "torch"
    if backend == "torch":
        return TorchBackend(group)
    if backend == "neuron":
        return NeuronBackend()
    raise ValueError(f"unknown tensor-parallel backend {backend!r}; choose 'torch', 'neuron' or 'auto'")
