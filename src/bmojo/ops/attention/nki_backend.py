"""The ``nki`` backend of the ``attention`` op: the per-call verifier and the autograd wrapper around the joint
B'MOJO attention kernels (``nki.py``). Same structure as ``ops/ssd/nki_backend.py``: on a Neuron device the kernels
run; with ``BMOJO_NKI_STANDIN=1`` the twin (``nki_twin.py``) takes their place with the same layouts; ``neuronxcc``
is imported only when a kernel really runs. Masks and the memory's visibility are built in XLA by
``nki_twin.kernel_inputs`` (all data-dependent indexing stays outside the kernels).
"""

from __future__ import annotations

import functools

import torch

from ..ssd.nki_backend import nki_unavailable, standin_enabled
from . import nki_twin

CHUNK = 128
_ORDER = nki_twin._ORDER


# Long on purpose: the op's signature, every option the kernels lack declined by name.
def supports_attention_nki(q, k, v, window, chunk_size, k_fade=None, v_fade=None, q_eid=None, memory=None,
                           key_mask=None, scale=None, fading_bias=None, self_bias=None, eidetic_bias=None,
                           k_self=None, v_self=None, doc_start=None, query_range=None):
    """True, or why this call runs the chunked form instead (shapes, dtypes, device only: no device read)."""
    why = nki_unavailable()
    if why:
        return why
    if not standin_enabled() and q.device.type != "xla":
        return f"tensors are on {q.device.type}, not an XLA device"
    if q.dtype not in (torch.float32, torch.bfloat16):
        return f"dtype {q.dtype}: the kernels take float32 or bfloat16"
    if key_mask is not None:
        return "a key padding mask (the kernels take none)"
    options = {"fading_bias": fading_bias, "self_bias": self_bias, "eidetic_bias": eidetic_bias, "k_self": k_self,
               "memory.bias": None if memory is None else memory.bias, "doc_start": doc_start,
               "query_range": query_range}
    used = [name for name, value in options.items() if value is not None]
    if used:
        return (
            f"{', '.join(used)}: the kernels take no key-set bias, self fading key, slot bias, document reset or "
            f"query range"
        )
    if k_fade is None or memory is None:
        return "no fading keys or no eidetic memory (the kernels score all three key sets)"
    length, head_dim, slots = q.shape[1], q.shape[3], memory.k.shape[2]
    if chunk_size != CHUNK:
        return f"chunk_size {chunk_size}: the kernels use {CHUNK}"
    if length % CHUNK or window % CHUNK or window == 0:
        return f"sequence length {length} / window {window} not a positive multiple of {CHUNK}"
    if head_dim > 128 or slots > 128:
        return f"head dim {head_dim} / memory size {slots} over 128"
    return True


@functools.lru_cache(maxsize=1)
def _neuron_kernels():
    from . import nki as kernels  # imports neuronxcc

    return kernels


def _arrays(static, tensors):
    t = dict(zip(_ORDER, tensors))
    return nki_twin.kernel_arrays(static, t)


class AttentionNKI(torch.autograd.Function):
    """(static, q, qe, kw, vw, kf, vf, mk, mv) -> o [b, H, L, D]; backward by the backward kernel (recomputing)."""

    @staticmethod
    def forward(ctx, static, *tensors):
        if standin_enabled():
            o, lse = nki_twin.attention_twin_fwd({**static, **dict(zip(_ORDER, tensors))})
        else:
            grid = _neuron_kernels().attn_fwd_kernel[tensors[0].shape[0], tensors[0].shape[1]]
            o, lse = grid(*_arrays(static, tensors))
            lse = lse[..., 0]
        ctx.static = static
        ctx.save_for_backward(*tensors, o, lse)
        return o

    @staticmethod
    def backward(ctx, do):
        *tensors, o, lse = ctx.saved_tensors
        if standin_enabled():
            g = nki_twin.attention_twin_bwd({**ctx.static, **dict(zip(_ORDER, tensors))}, o, lse, do)
            grads = [g[name] for name in _ORDER]
        else:
            grid = _neuron_kernels().attn_bwd_kernel[tensors[0].shape[0], tensors[0].shape[1]]
            grads = list(grid(*_arrays(ctx.static, tensors), o, lse[..., None], do.float().contiguous()))
            grads[6:] = [x.unflatten(2, tensors[6].shape[2:4]) for x in grads[6:]]
        return (None, *grads)


def bmojo_attention_nki(q, k, v, window, chunk_size, k_fade=None, v_fade=None, q_eid=None, memory=None,
                        key_mask=None, scale=None, fading_bias=None, self_bias=None, eidetic_bias=None,
                        k_self=None, v_self=None, doc_start=None, query_range=None):
    """Joint attention through the kernels; the signature and result of ``bmojo_attention_chunked``
    (call ``supports_attention_nki`` first: it refuses a key mask, the biases, the self fading key, document reset
    and a query range)."""
    if query_range is not None:
        raise ValueError("the NKI attention kernels compute every query: query_range is not supported")
    static, t = nki_twin.kernel_inputs(q, k, v, window, chunk_size, k_fade, v_fade, q_eid, memory, scale)
    o = AttentionNKI.apply(static, *(t[name] for name in _ORDER))
    return o.transpose(1, 2).to(q.dtype)
