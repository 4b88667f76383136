"""trn1 training on neuronx-distributed (NxD): what ``bmojo train --device xla --tp N [--zero1]`` builds.

``NeuronTraining`` follows the pattern of NxD's own trainers (``neuronx_distributed_config`` ->
``initialize_parallel_model`` -> ``initialize_parallel_optimizer``):

* **groups**: ``neuronx_distributed_config(tensor_parallel_size=N, ...)`` initialises NxD's ``parallel_state``
  (data-parallel size ``world / N``); the loop's ``ParallelContext`` takes every rank and group from it, never
  from a layout of its own (NxD strides its tensor-parallel groups across the node for tp 4 on trn1);
* **model**: the full model from the run's seed (the same on every rank, so every tensor-parallel group starts from
  the slices of one model), cut by the declared plan (``plan.py``) with bmojo's own parallel layers bound to NxD's
  tensor-parallel process group (``backends.TorchBackend``), inside ``initialize_parallel_model``, which moves it to
  the device keeping the tensor-parallel attributes NxD reads (``tensor_model_parallel``, ``partition_dim``,
  ``partition_stride``, ``num_partitions``); then ``lm_head`` is tied again;
* **optimizer**: ``initialize_parallel_optimizer(cfg, AdamW, groups)``. Its ``step()`` averages the gradients over
  the data-parallel group (all-reduce, or with ZeRO-1 ``NeuronZero1Optimizer``'s reduce-scatter, the AdamW state
  sharded over the data-parallel ranks), takes the global norm (tensor-parallel gradients summed over the group,
  replicated ones counted once), clips and updates; the norm is ``optimizer.grad_norm``.

Why bmojo's layers on NxD's group rather than NxD's ``ColumnParallelLinear``/``RowParallelLinear``
(``backends.NeuronBackend``): no new code (the plan and the layers are those the CPU tests check, so the loop runs
the same layer code on both paths), and NxD's process groups carry the whole replica-group mesh, so a
``torch.distributed`` all-reduce over them is an ``xm.all_reduce`` over the right replica groups on the ``xla``
backend. What this route gives up: NxD's sequence parallelism and its ``"full"`` activation checkpointing, which
look for NxD layers (neither is used).

Run on the CPU only, with the stand-ins in ``tests/neuron_standin`` (gloo; ``tests/test_train_nxd.py``): never on
trn1 or with the real neuronx-distributed, which imports only inside the Neuron SDK (SDK 2.28 + torch 2.9 for
trn1 training; the PyPI package of that name is a placeholder). Nothing here imports it at module load.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import BMojoError
from .backends import NeuronBackend, neuron_available
from .tensor_parallel import ParallelContext

__all__ = ["NXD_MISSING", "NeuronBackend", "NeuronTraining", "import_nxd", "neuron_available"]

NXD_MISSING = (
    "--device xla with --tp/--zero1 trains through neuronx-distributed, which does not import here ({error}): on "
    "trn1 run in the Neuron SDK 2.28 PyTorch environment (neuron/README.md); without Trainium use --device cpu"
)


def import_nxd():
    """``(neuronx_distributed, parallel_state)``, or ``BMojoError`` (one line) when NxD does not import."""
    try:
        import neuronx_distributed as nxd
        from neuronx_distributed.parallel_layers import parallel_state
    except Exception as exc:  # the package raises more than ImportError when the SDK is half present
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise BMojoError(NXD_MISSING.format(error=f"{type(exc).__name__}: {first}")) from None
    return nxd, parallel_state


class NeuronTraining:
    """NxD's parallel state, model and optimizer for one ``bmojo train`` process (call after
    ``torch.distributed.init_process_group("xla")``, on every rank: group creation is collective).

    ``max_grad_norm``: the clipping threshold (``math.inf``: none; the norm is still computed and logged)."""

    def __init__(self, tp_size: int, zero1: bool, max_grad_norm: float):
        self.nxd, ps = import_nxd()
        self.zero1, self.max_grad_norm = zero1, max_grad_norm
        self.config = self.nxd.neuronx_distributed_config(
            tensor_parallel_size=tp_size,
            optimizer_config={"zero_one_enabled": zero1, "grad_clipping": True, "max_grad_norm": max_grad_norm},
        )
        if not ps.model_parallel_is_initialized():  # NxD does it in the config when torch.distributed is up
            ps.initialize_model_parallel(tensor_model_parallel_size=tp_size)
        self.ctx = ParallelContext(
            ps.get_tensor_model_parallel_rank(),
            ps.get_tensor_model_parallel_size(),
            ps.get_tensor_model_parallel_group(),
            ps.get_data_parallel_rank(),
            ps.get_data_parallel_size(),
            ps.get_data_parallel_group(),
        )
        if self.ctx.tp_size != tp_size:
            raise BMojoError(f"neuronx-distributed formed tensor-parallel groups of {self.ctx.tp_size}, not {tp_size}")

    def build_model(self, config, seed: int, dtype: str, checkpoint: Path | None):
        """This rank's shard (``training.build_model``: seed, plan, checkpoint) through ``initialize_parallel_model``;
        returns the ``BMojoForCausalLM`` itself (NxD's wrapper adds nothing without pipeline parallelism)."""
        from .training import build_model

        wrapped = self.nxd.initialize_parallel_model(
            self.config, lambda: build_model(config, self.ctx, seed, dtype, checkpoint)
        )
        model = wrapped.original_module() if hasattr(wrapped, "original_module") else wrapped.module
        model.tie_weights()  # the move to an XLA device gives the LM head its own copy of the embedding
        return model

    def build_optimizer(self, groups: list[dict], lr: float, betas: tuple[float, float]):
        """NxD's optimizer over ``groups`` (AdamW; with ZeRO-1 ``NeuronZero1Optimizer`` over the data-parallel
        groups). NxD passes no threshold to its ZeRO-1 optimizer (which would clip at 1.0), hence ``max_norm``."""
        kwargs = {"max_norm": self.max_grad_norm} if self.zero1 else {}
        return self.nxd.initialize_parallel_optimizer(
            self.config, torch.optim.AdamW, groups, lr=lr, betas=betas, **kwargs
        )

    @staticmethod
    def grad_norm(optimizer) -> torch.Tensor:
        """The global gradient norm of the last ``optimizer.step()`` (before clipping)."""
        return optimizer.grad_norm
