"""trn1 training: the sharding plan (``plan.py``) on neuronx-distributed (NxD) layers (``backends.NeuronBackend``),
and ZeRO-1.

NOT RUN: neuronx-distributed imports only inside the Neuron SDK (torch-neuronx, torch-xla, neuronx-cc; SDK 2.28 +
torch 2.9 for trn1 training); the PyPI package of that name is a placeholder. Nothing here imports it at module
load; every entry point imports it when called and raises ``BMojoError`` when it is missing. What the CPU tests do
check is shared with this path: the rules table, the slicing, the local sizes, and the ``f``/``g`` semantics
(NxD's ``ColumnParallelLinear`` / ``RowParallelLinear`` / ``reduce_from_tensor_model_parallel_region`` are the
same operations as the stand-in's).
"""

from __future__ import annotations

import torch

from ..modeling_bmojo import BMojoForCausalLM
from .backends import NeuronBackend, _import_nxd, neuron_available
from .tensor_parallel import shard_model

__all__ = ["NeuronBackend", "initialize_neuron_training", "neuron_available"]


def _build_sharded(config):
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
