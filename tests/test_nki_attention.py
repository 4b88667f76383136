"""Layer A for the planned joint B'MOJO attention kernel (docs/kernels.md): the twin's online softmax over window,
fading and eidetic key tiles, with its lse-recomputing backward, against the dense reference — the output and the
gradients of q, k, v, the fading keys/values, the eidetic queries and the memory's keys/values. (No NKI source
exists for this kernel yet, so there is no layer B or C for it.)"""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from bmojo.ops.attention import bmojo_attention_ref
from bmojo.ops.attention.nki_twin import attention_twin_bwd, attention_twin_fwd, bmojo_attention_twin, kernel_inputs
from bmojo.ops.selection.common import INVALID_SCORE, EideticMemory

pytestmark = pytest.mark.core
C = 128


def make(L=384, W=128, H=4, Hkv=2, D=16, M=8, seed=0, memory="some", fading=True):
    g = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    t = dict(q=rn(1, L, H, D), k=rn(1, L, Hkv, D), v=rn(1, L, Hkv, D), q_eid=rn(1, L, H, D))
    t.update(k_fade=rn(1, L, Hkv, D), v_fade=rn(1, L, Hkv, D)) if fading else t.update(k_fade=None, v_fade=None)
    nc = L // C
    pos = torch.randint(0, L, (1, nc, M), generator=g)
    score = torch.rand(1, nc, M, generator=g, dtype=torch.float64).float()
    if memory == "some":
        score[torch.rand(1, nc, M, generator=g) < 0.3] = INVALID_SCORE
    elif memory == "empty":
        score[:] = INVALID_SCORE
    mem = EideticMemory(rn(1, nc, M, Hkv, D), rn(1, nc, M, Hkv, D), pos, score) if memory else None
    return t, mem


def rel_err(got, ref):
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("case", [dict(), dict(W=256, L=512), dict(memory="empty"), dict(memory=None),
                                  dict(fading=False), dict(L=128)],
                         ids=["W128-3chunks", "W256-4chunks", "empty-memory", "no-memory", "no-fading",
                              "first-chunk-only"])
@pytest.mark.parametrize("mm_dtype", [None, torch.bfloat16], ids=["fp32", "bf16-matmul"])
def test_twin_matches_the_dense_reference_output_and_every_gradient(case, mm_dtype):
    case = dict(case)
    W = case.pop("W", 128)
    t, mem = make(W=W, **case)
    leaves = {k: v.requires_grad_() for k, v in t.items() if v is not None}
    if mem is not None:
        mem = mem._replace(k=mem.k.requires_grad_(), v=mem.v.requires_grad_())
    args = dict(t, window=W, chunk_size=C, memory=mem)
    ref = bmojo_attention_ref(**args)
    f32 = {k: (v.detach().float().requires_grad_() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    mem32 = None
    if mem is not None:
        mem32 = mem._replace(k=mem.k.detach().float().requires_grad_(), v=mem.v.detach().float().requires_grad_())
    got = bmojo_attention_twin(**{**f32, "memory": mem32}, mm_dtype=mm_dtype)
    do = torch.randn(ref.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ref_inputs = list(leaves.values()) + ([mem.k, mem.v] if mem is not None else [])
    got_inputs = [f32[k] for k in leaves] + ([mem32.k, mem32.v] if mem is not None else [])
    g_ref = torch.autograd.grad((ref * do).sum(), ref_inputs, allow_unused=True)
    g_got = torch.autograd.grad((got * do.float()).sum(), got_inputs, allow_unused=True)
    errors = {"o": rel_err(got, ref)}
    for name, a, b in zip(list(leaves) + ["memory.k", "memory.v"], g_got, g_ref):
        if b is None or b.abs().max() == 0:
            assert a is None or a.abs().max() == 0, name
            continue
        errors["d" + name] = rel_err(a, b)
    assert max(errors.values()) <= (1e-5 if mm_dtype is None else 3e-2), errors
    if mm_dtype is not None:  # the rounding is really applied
        assert max(errors.values()) > 1e-4, errors


def test_lse_is_the_log_partition_of_the_joint_softmax():
    t, mem = make()
    static, kt = kernel_inputs(**{k: v.float() if v is not None else None for k, v in t.items()}, window=128,
                               chunk_size=C, memory=mem._replace(k=mem.k.float(), v=mem.v.float()))
    _, lse = attention_twin_fwd({**static, **kt})
    # Recompute the dense scores of one query with the reference's masks and compare log-sum-exp.
    i, h = 300, 1
    q = t["q"][0, i, h] * 16**-0.5
    kv = h // 2
    ctx = [j for j in range(i - 127, i + 1)]
    fade = [j for j in range(i - 255, i - 127)]
    c = i // C
    mems = [m for m in range(8) if mem.score[0, c, m] >= 0 and mem.pos[0, c, m] <= i - 128]
    scores = torch.cat([t["k"][0, ctx, kv] @ q, t["k_fade"][0, fade, kv] @ q,
                        mem.k[0, c, mems, kv] @ (t["q_eid"][0, i, h] * 16**-0.5)])
    assert abs(lse[0, h, i].item() - torch.logsumexp(scores, 0).item()) < 1e-5


# ------------------------------------------------------------------------------ layers B and C: the kernel source


@pytest.fixture(params=["standin", pytest.param("simulator", marks=pytest.mark.nki_sim)])
def attn_kernels(request):
    """(kernel module, simulate_kernel): the NumPy stand-in (CI) or the real Beta-1 simulator (opt-in)."""
    if request.param == "simulator":
        if importlib.util.find_spec("neuronxcc") is None:
            pytest.skip("neuronxcc does not import: the real NKI simulator ships only in the Neuron pip repository")
        import neuronxcc.nki as nki

        import bmojo.ops.attention.nki as kernels

        return kernels, nki.simulate_kernel
    import nki_standin

    import bmojo.ops.attention as attention_pkg

    path = Path(attention_pkg.__file__).with_name("nki.py")
    return nki_standin.load_kernel_module(path, "bmojo_attn_standin"), nki_standin.simulate_kernel


@pytest.mark.parametrize("case", [dict(), dict(W=256, L=512, D=32), dict(memory="empty"), dict(L=128),
                                  dict(W=512, L=1024, D=64, M=128, H=1, Hkv=1)],
                         ids=["W128-3chunks", "W256-4chunks-D32", "empty-memory", "first-chunk-only",
                              "preset-W512-D64-M128"])
def test_kernel_sources_equal_the_twin(case, attn_kernels):
    from bmojo.ops.attention.nki_twin import kernel_arrays

    case = dict(case)
    W = case.pop("W", 128)
    t, mem = make(W=W, **case)
    static, kt = kernel_inputs(**{k: v.float() for k, v in t.items()}, window=W, chunk_size=C,
                               memory=mem._replace(k=mem.k.float(), v=mem.v.float()))
    o_twin, lse_twin = attention_twin_fwd({**static, **kt})
    module, simulate = attn_kernels
    arrays = [a.numpy() for a in kernel_arrays(static, kt)]
    o, lse = simulate(module.attn_fwd_kernel[1, t["q"].shape[2]], *arrays)
    assert rel_err(torch.from_numpy(o), o_twin) <= 1e-5
    assert (torch.from_numpy(lse)[..., 0] - lse_twin).abs().max() <= 1e-4

    do = torch.randn(o_twin.shape, generator=torch.Generator().manual_seed(7))
    twin = attention_twin_bwd({**static, **kt}, o_twin, lse_twin, do)
    got = simulate(module.attn_bwd_kernel[1, t["q"].shape[2]], *arrays, o_twin.numpy(), lse_twin[..., None].numpy(),
                   do.numpy())
    for name, g in zip(("q", "qe", "kw", "vw", "kf", "vf", "mk", "mv"), got):
        want = twin[name].flatten(2, 3) if name in ("mk", "mv") else twin[name]
        assert g.shape == tuple(want.shape), name
        if want.abs().max() == 0:  # e.g. the eidetic gradients of an empty memory
            assert np.abs(g).max() == 0, name
        else:
            assert rel_err(torch.from_numpy(np.asarray(g)), want) <= 1e-5, name
