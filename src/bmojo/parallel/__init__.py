"""Scale-out: tensor parallelism with one set of sharding rules, checkpoint conversion between TP degrees, ZeRO-1.

* ``tensor_parallel``: the rules table, ``shard_model``, ``split_state_dict`` / ``merge_state_dicts``, the
  torch.distributed stand-in (gloo on CPU) and ``setup_tensor_parallel`` for torchrun jobs.
* ``neuron``: the same rules on neuronx-distributed layers for trn1, and NxD ZeRO-1 (import-guarded; not run here).
* ``convert``: ``python -m bmojo.parallel.convert --in DIR --out DIR --tp N``.
"""

from .tensor_parallel import (
    ParallelContext,
    Split,
    check_tp_size,
    clip_grad_norm_,
    merge_state_dicts,
    parameter_rules,
    setup_tensor_parallel,
    shard_model,
    split_state_dict,
    zero1_optimizer,
)

__all__ = [
    "ParallelContext",
    "Split",
    "check_tp_size",
    "clip_grad_norm_",
    "merge_state_dicts",
    "parameter_rules",
    "setup_tensor_parallel",
    "shard_model",
    "split_state_dict",
    "zero1_optimizer",
]
