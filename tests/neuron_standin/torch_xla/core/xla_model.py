"""Stand-in for ``torch_xla.core.xla_model`` (tests only)."""

import torch.distributed as dist

import torch_xla
from _standin_log import record

REDUCE_SUM = "sum"


def xla_device(n=None):
    return torch_xla.device()


def mark_step(wait=False):
    torch_xla.sync()


def add_step_closure(closure, args=(), run_async=False):
    torch_xla._closures.append((closure, tuple(args)))


def get_ordinal():
    return dist.get_rank() if dist.is_initialized() else 0


def xrt_world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def rendezvous(tag, payload=b"", replicas=()):
    if dist.is_initialized():
        dist.barrier()


def reduce_gradients(optimizer, groups=None, pin_layout=True):
    """Average the gradients over all processes (torch-xla: over ``groups``, default the world)."""
    if groups is not None:
        raise NotImplementedError("the stand-in averages over the world only")
    record("xm.reduce_gradients", world=dist.get_world_size())
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad.div_(dist.get_world_size())
