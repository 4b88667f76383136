"""Stand-in for torch-xla (tests only; see tests/neuron_standin/README.md): the CPU is the device, a "step graph"
is whatever ran since the last ``sync()``, which runs the step closures queued in it."""

import torch

from _standin_log import record

__version__ = "0.0+standin"
_closures: list = []


def device(index=None):
    return torch.device("cpu")


def sync(wait=False):
    """``xm.mark_step``: the end of a step graph. Recorded, then the closures queued during the step run."""
    record("mark_step")
    pending = list(_closures)
    _closures.clear()
    for fn, args in pending:
        fn(*args)
