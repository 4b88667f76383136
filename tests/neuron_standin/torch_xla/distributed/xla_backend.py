"""Stand-in for ``torch_xla.distributed.xla_backend`` (tests only): the ``xla`` backend is gloo, ``xla://`` is
``env://`` (torchrun's variables)."""

import sys

import torch.distributed as dist


def _create_gloo(store, rank, size, timeout):
    return dist.ProcessGroupGloo(store, rank, size, timeout)


def _xla_rendezvous(url, timeout=None, **kwargs):
    handlers = sys.modules["torch.distributed.rendezvous"]
    return handlers._env_rendezvous_handler("env://", **({"timeout": timeout} if timeout else {}), **kwargs)


if "xla" not in dist.Backend.backend_list:
    dist.Backend.register_backend("xla", _create_gloo, devices=["cpu"])
    dist.register_rendezvous_handler("xla", _xla_rendezvous)
