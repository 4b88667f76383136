"""Where training runs: the CPU, or an XLA device (a Trainium NeuronCore; torch-xla's CPU client stands in).

``Device`` holds the few things the training loop does differently on XLA, so the loop itself reads the same:

- tensors are lazy: a step is traced, then compiled and run at ``barrier()`` (``torch_xla.sync()``). Everything
  that needs a value on the host during a step (logging, the divergence check) goes through ``after_step``, which
  on XLA becomes an ``xm.add_step_closure`` run once the step's graph has executed, so no host read splits the
  step into several graphs;
- batches reach the device through ``pl.MpDeviceLoader`` (transfer in a background thread);
- several processes use the ``xla`` process group, and gradients are averaged with ``xm.reduce_gradients``
  instead of DDP (what ``xm.optimizer_step`` does, split in two so that clipping sees the averaged gradients).

torch-xla is imported only when ``--device xla`` asks for it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .errors import BMojoError

DEVICES = ("cpu", "xla")

XLA_MISSING = (
    "--device xla needs torch-xla, which does not import here ({error}). On trn1, run in the Neuron SDK PyTorch "
    "environment (neuron/env.sh); on a CPU, scripts/setup_xla.sh builds ./.venv-xla (torch 2.9 + torch-xla 2.9; "
    "run with PJRT_DEVICE=CPU)"
)


def _torch_xla():
    try:
        import torch_xla
        import torch_xla.core.xla_model as xm
        import torch_xla.distributed.parallel_loader as pl
    except ImportError as exc:
        raise BMojoError(
            XLA_MISSING.format(error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        ) from None
    return torch_xla, xm, pl


class Device:
    """``name`` is "cpu" or "xla"; ``torch_device`` is where the model and batches live."""

    def __init__(self, name: str):
        if name not in DEVICES:
            raise BMojoError(f"device {name!r} is not supported; choose one of {', '.join(DEVICES)}")
        self.name = name
        self.is_xla = name == "xla"
        if self.is_xla:
            self._torch_xla, self._xm, self._pl = _torch_xla()
            self.torch_device = self._torch_xla.device()
        else:
            self.torch_device = torch.device("cpu")

    @property
    def type(self) -> str:
        return self.torch_device.type

    def init_process_group(self, world_size: int) -> None:
        """The collectives backend for the ``world_size`` processes ``torchrun`` started: gloo on the CPU, xla
        (Neuron collectives over the NeuronCores) on XLA."""
        if not dist.is_initialized():
            if self.is_xla:
                import torch_xla.distributed.xla_backend  # noqa: F401  (registers the "xla" backend)

                dist.init_process_group("xla", init_method="xla://")
            else:
                dist.init_process_group("gloo")
        if dist.get_world_size() != world_size:
            # torch-xla's CPU client (PJRT_DEVICE=CPU) gives every torchrun process a world of its own: averaging
            # over it would silently train each process alone.
            raise BMojoError(
                f"torchrun started {world_size} processes but the {dist.get_backend()} process group holds "
                f"{dist.get_world_size()}; several XLA processes need Neuron devices (PJRT_DEVICE=NEURON on trn1), "
                "torch-xla's CPU client runs one"
            )

    def place_model(self, model):
        """Move ``model`` here. Moving to XLA gives each module its own copy of a shared parameter, which unties
        ``lm_head`` from the embedding: tie them again."""
        model.to(self.torch_device)
        if self.is_xla:
            model.tie_weights()
        return model

    def barrier(self) -> None:
        """End of a step: on XLA, compile (first time) and run the traced graph; nothing on the CPU."""
        if self.is_xla:
            self._torch_xla.sync()

    def after_step(self, fn, *args) -> None:
        """Call ``fn(*args)`` once the current step's tensors hold values: now on the CPU, after ``barrier()`` on
        XLA (the tensors in ``args`` are then materialised without splitting the step's graph)."""
        if self.is_xla:
            self._xm.add_step_closure(fn, args)
        else:
            fn(*args)

    def loader(self, batches):
        """Iterate ``batches`` (CPU tensors) as tensors on this device."""
        if self.is_xla:
            return self._pl.MpDeviceLoader(batches, self.torch_device)
        return (batch.to(self.torch_device) for batch in batches)

    def reduce_gradients(self, optimizer, world_size: int) -> None:
        """Average the gradients over the processes (on the CPU, DDP has done it during backward)."""
        if self.is_xla and world_size > 1:
            self._xm.reduce_gradients(optimizer)
