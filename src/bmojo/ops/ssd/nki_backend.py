"""The ``nki`` backend of the ``ssd`` op: layout preparation, the per-call verifier, and the autograd wrapper.

``ssd_nki`` has the signature of ``ssd_chunked``. It computes ``u = dt * x`` and ``a = dt * A`` and expands the
B/C groups in XLA (so autograd handles those), then calls ``SSDCore`` — a ``torch.autograd.Function`` whose
forward and backward are the NKI kernels of ``nki.py`` on a Neuron device, or the torch twin (``nki_twin.py``,
same layout contract) where ``BMOJO_NKI_STANDIN=1`` (the XLA:CPU tier and the CPU tests). ``neuronxcc`` is imported
only by ``_neuron_kernels``, i.e. only when a kernel really runs.

``nki_unavailable()`` says why the backend cannot run at all (the registry turns it into one error line);
``supports_nki(...)`` is the cheap per-call check (True or the reason the call falls back to ``chunked``).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch
from torch import Tensor

from ..common import expand_groups
from . import nki_twin

CHUNK = nki_twin.CHUNK
MAX_DIM = 128


def standin_enabled() -> bool:
    """``BMOJO_NKI_STANDIN=1``: the torch twin takes the kernels' place (testing the wiring without Neuron)."""
    return os.environ.get("BMOJO_NKI_STANDIN") == "1"


@functools.lru_cache(maxsize=1)
def _neuron_platform() -> str | None:
    """None where torch-xla runs on a Neuron device, else the reason it does not."""
    if importlib.util.find_spec("neuronxcc") is None:
        return "neuronxcc does not import (the Neuron compiler ships only in the Neuron pip repository)"
    if importlib.util.find_spec("torch_xla") is None:
        return "torch_xla does not import"
    import torch_xla.runtime as xr

    if xr.device_type() != "NEURON":
        return f"the XLA device is {xr.device_type()}, not NEURON"
    return None


def nki_unavailable() -> str | None:
    """None if the ``nki`` backend can run here, else why not (one line)."""
    return None if standin_enabled() else _neuron_platform()


def supports_nki(x, dt, A, B, C, chunk_size=None, D=None, initial_state=None):
    """True, or why this call runs the chunked form instead. Cheap: shapes, dtypes and device only."""
    why = nki_unavailable()
    if why:
        return why
    if not standin_enabled() and x.device.type != "xla":
        return f"tensors are on {x.device.type}, not an XLA device"
    if x.dtype not in (torch.float32, torch.bfloat16):
        return f"dtype {x.dtype}: the kernels take float32 or bfloat16"
    seqlen, headdim, dstate = x.shape[1], x.shape[3], B.shape[-1]
    if chunk_size not in (None, CHUNK):
        return f"chunk_size {chunk_size}: the kernels use {CHUNK}"
    if seqlen % CHUNK:
        return f"sequence length {seqlen} is not a multiple of {CHUNK}"
    if headdim > MAX_DIM or dstate > MAX_DIM:
        return f"head dim {headdim} / state size {dstate} over {MAX_DIM}"
    return True


@functools.lru_cache(maxsize=1)
def _neuron_kernels():
    from . import nki as kernels  # imports neuronxcc

    return kernels


class SSDCore(torch.autograd.Function):
    """(u, a, bm, cm, s0) -> (y, s_final) in kernel layouts; backward by the backward kernel (recomputing)."""

    @staticmethod
    def forward(ctx, u, a, bm, cm, s0):
        ctx.save_for_backward(u, a, bm, cm, s0)
        if standin_enabled():
            return nki_twin.ssd_twin_fwd(u, a, bm, cm, s0)
        k = _neuron_kernels()
        return k.ssd_fwd_kernel[u.shape[0], u.shape[1]](u, a, bm, cm, s0, nki_twin.triangle(u.device))

    @staticmethod
    def backward(ctx, dy, ds):
        u, a, bm, cm, s0 = ctx.saved_tensors
        dy = torch.zeros_like(u) if dy is None else dy.float()
        ds = torch.zeros_like(s0) if ds is None else ds.float()
        if standin_enabled():
            return nki_twin.ssd_twin_bwd(u, a, bm, cm, s0, dy, ds)
        k = _neuron_kernels()
        grid = k.ssd_bwd_kernel[u.shape[0], u.shape[1]]
        return grid(u, a, bm, cm, s0, nki_twin.triangle(u.device), dy, ds)


def to_kernel_layout(x, dt, A, B, C, initial_state=None):
    """[b,L,H,P] etc. -> (u, a, bm, cm, s0) fp32 in the kernel layouts (differentiable)."""
    nheads, dstate = x.shape[2], B.shape[-1]
    xf, dtf = x.float(), dt.float()
    u = (dtf[..., None] * xf).permute(0, 2, 1, 3).contiguous()
    a = (dtf * A.float()).permute(0, 2, 1).unsqueeze(-1).contiguous()
    bm = expand_groups(B.float(), nheads).permute(0, 2, 1, 3).contiguous()
    cm = expand_groups(C.float(), nheads).permute(0, 2, 1, 3).contiguous()
    if initial_state is None:
        s0 = xf.new_zeros(x.shape[0], nheads, dstate, x.shape[3])
    else:
        s0 = initial_state.float().transpose(-1, -2).contiguous()
    return u, a, bm, cm, s0


def ssd_nki(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size=CHUNK, D=None, initial_state=None
) -> tuple[Tensor, Tensor]:
    """SSD through the kernels; signature, shapes and dtypes of ``ssd_chunked`` (call ``supports_nki`` first)."""
    y, s_final = SSDCore.apply(*to_kernel_layout(x, dt, A, B, C, initial_state))
    y = y.permute(0, 2, 1, 3)
    if D is not None:
        y = y + D.float()[:, None] * x.float()
    return y.to(x.dtype), s_final.transpose(-1, -2)
