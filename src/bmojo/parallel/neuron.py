"""trn1 backend: the sharding rules of ``tensor_parallel`` on neuronx-distributed (NxD) layers, and ZeRO-1.

NOT RUN: neuronx-distributed imports only inside the Neuron SDK (torch-neuronx, torch-xla, neuronx-cc; SDK 2.28 +
torch 2.9 for trn1 training); the PyPI package of that name is a placeholder. Nothing here imports it at module
load; every entry point imports it when called and raises ``BMojoError`` when it is missing. What the CPU tests do
check is shared with this path: the rules table, the slicing, the local sizes, and the ``f``/``g`` semantics
(NxD's ``ColumnParallelLinear`` / ``RowParallelLinear`` / ``reduce_from_tensor_model_parallel_region`` are the
same operations as the stand-in's).
"""

from __future__ import annotations

import torch

from ..errors import BMojoError

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


def _build_sharded(config):
    from ..modeling_bmojo import BMojoForCausalLM
    from .tensor_parallel import shard_model

    backend = NeuronBackend()
    rank, size = backend.rank_and_size()
    return shard_model(BMojoForCausalLM(config), rank, size, backend=backend)


def initialize_neuron_training(
    config,
    tensor_parallel_size: int,
    optimizer_class=torch.optim.AdamW,
    param_groups=None,
    zero_one: bool = True,
    max_grad_norm: float | None = 1.0,
    **optimizer_kwargs,
):
    """NxD model and optimizer for trn1: TP by the rules of ``tensor_parallel``, ZeRO-1 over the data-parallel
    ranks (``initialize_parallel_optimizer(..., zero_one_enabled=True)``), NxD's TP-aware gradient clipping.

    Call after ``torch.distributed.init_process_group("xla")`` under torchrun. Returns ``(model, optimizer)``
    (``NxDModel``, ``NxDOptimizer``). ``param_groups``: a function ``model -> parameter groups`` (e.g. to keep
    norms out of weight decay); default all parameters. Weights start from ``BMojoForCausalLM(config)``'s
    initialisation; to start from a checkpoint, load ``bmojo.parallel.convert.rank_state_dict`` into the model.
    NOT RUN (no Trainium machine, package not installable here).
    """
    nxd = _import_nxd()[0]
    nxd_config = nxd.neuronx_distributed_config(
        tensor_parallel_size=tensor_parallel_size,
        optimizer_config={
            "zero_one_enabled": zero_one,
            "grad_clipping": max_grad_norm is not None,
            "max_grad_norm": 1.0 if max_grad_norm is None else max_grad_norm,
        },
    )
    model = nxd.initialize_parallel_model(nxd_config, _build_sharded, config)
    params = param_groups(model) if param_groups is not None else model.parameters()
    optimizer = nxd.initialize_parallel_optimizer(nxd_config, optimizer_class, params, **optimizer_kwargs)
    return model, optimizer
