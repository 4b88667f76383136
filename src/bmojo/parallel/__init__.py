"""Scale-out: tensor parallelism with one set of sharding rules, checkpoint conversion between TP degrees, ZeRO-1.

* ``plan``: the declared sharding plan (``TP_PLAN``: module -> style; ``parameter_rules``: parameter -> split) and
  ``split_state_dict`` / ``merge_state_dicts``;
* ``backends``: the torch.distributed stand-in (gloo on CPU) and the neuronx-distributed layers (import-guarded);
* ``tensor_parallel``: ``shard_model`` (applies the plan) and ``setup_tensor_parallel`` for torchrun jobs;
* ``neuron``: trn1 training on neuronx-distributed (``bmojo train --device xla --tp N [--zero1]``; run only on
  the CPU stand-ins of tests/neuron_standin).
* ``convert``: ``python -m bmojo.parallel.convert --in DIR --out DIR --tp N``.
"""

from .plan import TP_PLAN, Split, check_tp_size, merge_state_dicts, parameter_rules, split_state_dict
from .tensor_parallel import ParallelContext, clip_grad_norm_, setup_tensor_parallel, shard_model, zero1_optimizer

__all__ = [
    "TP_PLAN",
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
