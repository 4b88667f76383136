"""Helpers shared by every op and every form of it (reference, chunked, single-step).

The precision rule: decays, softmax and normalisation run in at least float32 whatever the input precision
(bfloat16/float16 inputs are upcast; float64 stays float64 so that the float64 equality tests are exact).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor


def compute_dtype(*tensors: Tensor | torch.dtype | None) -> torch.dtype:
    """float64 if any given tensor (or dtype) is float64, else float32: the dtype decay and softmax math runs in."""
    for t in tensors:
        dtype = t if isinstance(t, torch.dtype) else getattr(t, "dtype", None)
        if dtype == torch.float64:
            return torch.float64
    return torch.float32


def cast(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x.to(dtype)``, or ``x`` itself when it has that dtype already: the same tensor without an ``aten::to``
    call (a decoding step would otherwise dispatch hundreds of these no-op casts per token)."""
    return x if x.dtype == dtype else x.to(dtype)


def at_least_fp32(x: Tensor) -> Tensor:
    """``x`` in ``compute_dtype(x)``: float32 for bf16/fp16/fp32 inputs, float64 stays float64."""
    return cast(x, compute_dtype(x))


def expand_groups(t: Tensor, nheads: int) -> Tensor:
    """``[..., G, N] -> [..., H, N]``: repeat each group for the ``H // G`` heads that share it.

    Used for the SSM's B/C groups and for grouped-query attention's key/value heads (head ``h`` reads group
    ``h // (H // G)``). Raises ``ValueError`` when ``G`` does not divide ``H``.
    """
    ngroups = t.shape[-2]
    if nheads % ngroups:
        raise ValueError(f"nheads={nheads} not divisible by ngroups={ngroups}")
    return t.repeat_interleave(nheads // ngroups, dim=-2)


def autocast_off(device: torch.device):
    """A context in which autocast does not lower matmuls to bf16/fp16 on ``device``: the decay prefix sums run in
    the float32/float64 their inputs have (under ``torch.autocast`` a matmul of float32 tensors still runs in bf16,
    which would round every decay exponent to 8 bits of mantissa). A no-op where autocast is off."""
    try:
        enabled = torch.is_autocast_enabled(device.type)
    except (RuntimeError, ValueError, TypeError):  # a device type autocast does not know (meta)
        enabled = False
    return torch.autocast(device_type=device.type, enabled=False) if enabled else contextlib.nullcontext()


def custom_backward_applies(*tensors: Tensor) -> bool:
    """Whether an op should run through its ``torch.autograd.Function`` (a backward of its own) rather than the same
    math as plain ops: only when a gradient will be computed for one of ``tensors`` and the call is not being traced
    by ``torch.jit.trace``, which cannot record a Python autograd function (the trn1 prefill export). Plain ops
    otherwise: a Function's forward adds a Python call per op and keeps its saved tensors for nothing."""
    if torch.jit.is_tracing() or not torch.is_grad_enabled():
        return False
    return any(t.requires_grad for t in tensors)
