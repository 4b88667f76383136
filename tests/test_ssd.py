"""Specification of bmojo.ops.ssd: chunked and one-step forms agree with the sequential scan."""

import itertools
import math

import pytest
import torch

from bmojo.ops.ssd import ssd_chunked, ssd_ref, ssd_step
from bmojo.ops.ssd.chunk import decay_exp, segsum, segsum_ref

# core: must also pass on the trn1 stack (torch 2.9 + transformers 4.57); the XLA tier runs it there too.
pytestmark = pytest.mark.core


def make_inputs(batch=2, L=64, H=4, P=8, G=1, N=6, dtype=torch.float64, seed=0, D=True, init=True):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    x = randn(batch, L, H, P)
    # softplus-like positive steps in a realistic range, some small some large
    dt = torch.nn.functional.softplus(randn(batch, L, H) - 1.0).to(dtype)
    A = -torch.exp(torch.rand(H, generator=g, dtype=torch.float64) * 2 - 1).to(dtype)  # [-e, -1/e]
    B = randn(batch, L, G, N)
    C = randn(batch, L, G, N)
    Dv = randn(H) if D else None
    s0 = randn(batch, H, P, N) if init else None
    return dict(x=x, dt=dt, A=A, B=B, C=C, D=Dv, initial_state=s0)


# ---------------------------------------------------------------------------------------
# segsum


def test_segsum_matches_loop_and_is_nonpositive():
    torch.manual_seed(0)
    a = -torch.rand(3, 2, 9, dtype=torch.float64)
    s, r = segsum(a), segsum_ref(a)
    assert torch.equal(torch.isinf(s), torch.isinf(r))
    assert torch.equal(torch.isinf(s), ~torch.tril(torch.ones(9, 9, dtype=torch.bool)).expand_as(s))
    finite = torch.isfinite(r)
    torch.testing.assert_close(s[finite], r[finite], atol=1e-14, rtol=0)
    assert (s[finite] <= 0).all()
    assert (torch.diagonal(s, dim1=-2, dim2=-1) == 0).all()


def test_segsum_large_decays_have_finite_grads():
    # cumsum(a)[i] - cumsum(a)[j] with exp taken separately would give 0/0 here.
    a = (-200.0 * torch.rand(2, 64, dtype=torch.float64)).requires_grad_()
    out = torch.exp(segsum(a))
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(a.grad).all()


# ---------------------------------------------------------------------------------------
# chunked == sequential reference

CASES = list(
    itertools.product(
        [1, 7, 64, 100, 257],  # L (multiples and non-multiples of the chunk)
        [32, 64],  # chunk_size
        [1, 2],  # G
        [False, True],  # D
        [False, True],  # initial_state
    )
)


@pytest.mark.parametrize("L,chunk,G,D,init", CASES)
def test_chunked_matches_ref_fp64(L, chunk, G, D, init):
    inp = make_inputs(L=L, G=G, D=D, init=init, seed=L * 7 + chunk + G)
    y_ref, s_ref = ssd_ref(**inp)
    y, s = ssd_chunked(chunk_size=chunk, **inp)
    assert y.shape == y_ref.shape == inp["x"].shape
    assert s.shape == s_ref.shape == (2, 4, 8, 6)
    assert y.dtype == torch.float64 and s.dtype == torch.float64
    torch.testing.assert_close(y, y_ref, atol=1e-10 * max(1.0, y_ref.abs().max().item()), rtol=1e-9)
    torch.testing.assert_close(s, s_ref, atol=1e-10 * max(1.0, s_ref.abs().max().item()), rtol=1e-9)


@pytest.mark.parametrize("L,chunk,G,D,init", [c for c in CASES if c[3] == c[4]])
def test_chunked_matches_ref_fp32(L, chunk, G, D, init):
    inp = make_inputs(L=L, G=G, D=D, init=init, dtype=torch.float32, seed=L + chunk + G)
    y_ref, s_ref = ssd_ref(**inp)
    y, s = ssd_chunked(chunk_size=chunk, **inp)
    assert y.dtype == torch.float32 and s.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, atol=1e-4 * max(1.0, y_ref.abs().max().item()), rtol=1e-4)
    torch.testing.assert_close(s, s_ref, atol=1e-4 * max(1.0, s_ref.abs().max().item()), rtol=1e-4)


@pytest.mark.parametrize("chunk", [1, 3, 16, 50, 128])
def test_chunk_size_does_not_change_result(chunk):
    inp = make_inputs(L=50, G=2, seed=3)
    y_ref, s_ref = ssd_ref(**inp)
    y, s = ssd_chunked(chunk_size=chunk, **inp)
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(s, s_ref, atol=1e-10, rtol=1e-9)


def test_chunked_split_sequence_equals_whole():
    # Prefill in two calls, carrying the state, is the same as one call.
    inp = make_inputs(L=90, G=2, seed=4)
    y, s = ssd_chunked(chunk_size=32, **inp)
    cut = 37
    first = {k: (v[:, :cut] if k in ("x", "dt", "B", "C") else v) for k, v in inp.items()}
    second = {k: (v[:, cut:] if k in ("x", "dt", "B", "C") else v) for k, v in inp.items()}
    y1, s1 = ssd_chunked(chunk_size=32, **first)
    second["initial_state"] = s1
    y2, s2 = ssd_chunked(chunk_size=32, **second)
    torch.testing.assert_close(torch.cat([y1, y2], dim=1), y, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(s2, s, atol=1e-10, rtol=1e-9)


def test_chunked_non_contiguous_inputs():
    inp = make_inputs(L=40, G=2, seed=5)
    y_ref, s_ref = ssd_ref(**inp)
    # Same values, non-contiguous storage (as produced by slicing a fused projection).
    nc = dict(inp)
    nc["x"] = inp["x"].transpose(1, 2).contiguous().transpose(1, 2)
    nc["B"] = torch.cat([inp["B"], inp["C"]], dim=-1)[..., : inp["B"].shape[-1]]
    nc["dt"] = inp["dt"].transpose(0, 1).contiguous().transpose(0, 1)
    assert not nc["x"].is_contiguous() and not nc["B"].is_contiguous()
    y, s = ssd_chunked(chunk_size=16, **nc)
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(s, s_ref, atol=1e-10, rtol=1e-9)


def test_chunked_strong_decay_is_finite_and_matches():
    # a = dt*A down to about -60 per step: within-chunk cumulative decays of -1000s.
    inp = make_inputs(L=70, G=1, seed=6)
    inp["dt"] = inp["dt"] * 20
    inp["A"] = inp["A"] * 3
    for v in ("x", "dt", "A", "B", "C", "D", "initial_state"):
        inp[v] = inp[v].clone().requires_grad_()
    y_ref, s_ref = ssd_ref(**inp)
    y, s = ssd_chunked(chunk_size=32, **inp)
    torch.testing.assert_close(y, y_ref, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(s, s_ref, atol=1e-9, rtol=1e-9)
    (y.sum() + s.sum()).backward()
    for v in ("x", "dt", "A", "B", "C", "D", "initial_state"):
        assert torch.isfinite(inp[v].grad).all(), v


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decay_exp_is_exp_with_underflowing_results_flushed(dtype):
    floor = math.log(torch.finfo(dtype).tiny) + 2.0
    x = torch.tensor([0.0, -1.0, -50.0, floor + 0.01, floor - 0.01, -1e4, float("-inf")], dtype=dtype)
    got = decay_exp(x)
    keep = x >= floor
    torch.testing.assert_close(got[keep], torch.exp(x[keep]), rtol=0, atol=0)
    assert (got[~keep] == 0).all() and keep.tolist() == [True, True, True, True, False, False, False]
    assert torch.isnan(decay_exp(torch.tensor([float("nan")], dtype=dtype))).all()  # NaN is not hidden
    x = x[:-1].clone().requires_grad_()  # the gradient: exp's where kept, 0 where flushed (never NaN)
    decay_exp(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.where(x >= floor, torch.exp(x.detach()), 0.0), rtol=0, atol=0)


def test_decay_exp_saves_only_its_result_for_the_backward():
    """As ``exp``: one saved tensor, the result (autograd through the clamp and the ``where`` would keep their inputs
    and masks too: the chunked SSD's saved activations grew by a tenth)."""
    saved = []
    x = torch.tensor([0.0, -1.0, -200.0, float("-inf")], requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = decay_exp(x)
    assert len(saved) == 1 and saved[0].data_ptr() == y.data_ptr()
    torch.autograd.gradcheck(decay_exp, torch.tensor([-0.5, -3.0, -800.0], dtype=torch.float64, requires_grad=True))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decay_exp_refuses_half_precision(dtype):
    with pytest.raises(ValueError, match="float32 or float64"):
        decay_exp(torch.zeros(3, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chunked_never_exponentiates_an_underflowing_exponent(dtype):
    """The mechanism behind ``decay_exp``: every ``exp`` the chunked SSD runs, forward and backward, gets inputs whose
    results are normal numbers (a CPU's ``exp`` is ~100x slower per element where the result underflows, ~15x for
    ``-inf``: the segment sums' upper triangle and strongly decaying heads)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    smallest = []

    class Exps(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.exp.default, torch.ops.aten.exp_.default):
                smallest.append(float(args[0].min()))
            return func(*args, **(kwargs or {}))

    inp = make_inputs(L=70, G=1, seed=6, dtype=dtype)
    inp["dt"] = inp["dt"] * (20 if dtype == torch.float32 else 60)  # segment sums below log(tiny) within a chunk
    for v in ("x", "dt", "B", "C"):
        inp[v] = inp[v].clone().requires_grad_()
    with Exps():
        y, s = ssd_chunked(chunk_size=32, **inp)
        (y.sum() + s.sum()).backward()
    assert len(smallest) >= 3 and min(smallest) >= math.log(torch.finfo(dtype).tiny) + 2.0 - 1e-4
    seg = segsum((inp["dt"][0, :32] * inp["A"]).T.detach())  # the first chunk's segment sums, per head
    assert seg[torch.isfinite(seg)].min() < math.log(torch.finfo(dtype).tiny)  # there were underflows to avoid


# ---------------------------------------------------------------------------------------
# gradients

GRAD_NAMES = ["x", "dt", "A", "B", "C", "D", "initial_state"]


def _grads(fn, inp, dy, dstate):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inp.items() if v is not None}
    y, s = fn(**leaves)
    ((y * dy).sum() + (s * dstate).sum()).backward()
    return {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize(
    "L,chunk,G,D,init",
    [(100, 32, 2, True, True), (7, 64, 1, True, True), (64, 32, 1, False, True), (65, 16, 2, True, False)],
)
def test_chunked_grads_match_ref_fp64(L, chunk, G, D, init):
    inp = make_inputs(L=L, G=G, D=D, init=init, seed=11 + L)
    g = torch.Generator().manual_seed(99)
    dy = torch.randn(inp["x"].shape, generator=g, dtype=torch.float64)
    dstate = torch.randn(2, 4, 8, 6, generator=g, dtype=torch.float64)
    g_ref = _grads(ssd_ref, inp, dy, dstate)
    g_chk = _grads(lambda **kw: ssd_chunked(chunk_size=chunk, **kw), inp, dy, dstate)
    expected = [n for n in GRAD_NAMES if inp[n] is not None]
    assert sorted(g_chk) == sorted(expected)
    for name in expected:
        assert g_chk[name] is not None, name
        ref = g_ref[name]
        torch.testing.assert_close(
            g_chk[name], ref, atol=1e-9 * max(1.0, ref.abs().max().item()), rtol=1e-8, msg=lambda m: f"{name}: {m}"
        )


def test_chunked_gradcheck_tiny():
    inp = make_inputs(batch=1, L=5, H=2, P=2, G=1, N=3, seed=12)
    names = GRAD_NAMES
    args = [inp[n].detach().clone().requires_grad_() for n in names]

    def fn(x, dt, A, B, C, D, s0):
        return ssd_chunked(x, dt, A, B, C, 2, D=D, initial_state=s0)

    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------
# one-step recurrence


@pytest.mark.parametrize("G,D,dtype", [(1, True, torch.float64), (2, False, torch.float64), (2, True, torch.float32)])
def test_step_iterated_matches_ref(G, D, dtype):
    inp = make_inputs(L=30, G=G, D=D, dtype=dtype, seed=21)
    y_ref, s_ref = ssd_ref(**inp)
    state = inp["initial_state"].clone()
    state_before = state.clone()
    ys = []
    for t in range(30):
        y_t, new_state = ssd_step(
            state, inp["x"][:, t], inp["dt"][:, t], inp["A"], inp["B"][:, t], inp["C"][:, t], D=inp["D"]
        )
        assert y_t.shape == (2, 4, 8) and y_t.dtype == dtype
        assert new_state.shape == state.shape and new_state.dtype == dtype
        if t == 0:
            assert torch.equal(state, state_before), "ssd_step must not modify its input state"
        state = new_state
        ys.append(y_t)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(torch.stack(ys, 1), y_ref, atol=tol * max(1.0, y_ref.abs().max().item()), rtol=tol)
    torch.testing.assert_close(state, s_ref, atol=tol * max(1.0, s_ref.abs().max().item()), rtol=tol)


def test_step_bf16_inputs_keep_fp32_state():
    inp = make_inputs(L=1, G=1, dtype=torch.bfloat16, seed=22)
    state = torch.randn(2, 4, 8, 6)
    y, new_state = ssd_step(
        state, inp["x"][:, 0], inp["dt"][:, 0], inp["A"], inp["B"][:, 0], inp["C"][:, 0], D=inp["D"]
    )
    assert y.dtype == torch.bfloat16 and new_state.dtype == torch.float32


# ---------------------------------------------------------------------------------------
# dt == 0 is an identity step (padding)


@pytest.mark.parametrize("fn", ["ref", "chunked"])
def test_dt_zero_positions_are_identity(fn):
    run = ssd_ref if fn == "ref" else (lambda **kw: ssd_chunked(chunk_size=16, **kw))
    inp = make_inputs(L=37, G=2, seed=31)
    y, s = run(**inp)

    # Append 20 positions with dt = 0, x = 0 and arbitrary (non-zero) B, C.
    extra = make_inputs(L=20, G=2, seed=32)
    padded = dict(inp)
    padded["x"] = torch.cat([inp["x"], torch.zeros_like(extra["x"])], 1)
    padded["dt"] = torch.cat([inp["dt"], torch.zeros_like(extra["dt"])], 1)
    padded["B"] = torch.cat([inp["B"], extra["B"]], 1)
    padded["C"] = torch.cat([inp["C"], extra["C"]], 1)
    y_p, s_p = run(**padded)
    torch.testing.assert_close(s_p, s, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(y_p[:, :37], y, atol=1e-12, rtol=1e-12)

    # Identity steps inserted in the middle also leave the final state unchanged.
    mid = dict(inp)
    for k in ("x", "dt", "B", "C"):
        filler = torch.zeros_like(extra[k]) if k in ("x", "dt") else extra[k]
        mid[k] = torch.cat([inp[k][:, :10], filler, inp[k][:, 10:]], 1)
    y_m, s_m = run(**mid)
    torch.testing.assert_close(s_m, s, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(torch.cat([y_m[:, :10], y_m[:, 30:]], 1), y, atol=1e-12, rtol=1e-12)


# ---------------------------------------------------------------------------------------
# low precision


def test_bf16_inputs_close_to_fp32_and_dtypes():
    inp32 = make_inputs(L=100, G=2, dtype=torch.float32, seed=41)
    inp16 = {k: v.to(torch.bfloat16) for k, v in inp32.items()}
    y16, s16 = ssd_chunked(chunk_size=32, **inp16)
    assert y16.dtype == torch.bfloat16 and s16.dtype == torch.float32
    assert y16.shape == inp32["x"].shape

    # Against fp32 on the same (bf16-rounded) values: only the final rounding of y differs.
    y_same, s_same = ssd_chunked(chunk_size=32, **{k: v.float() for k, v in inp16.items()})
    torch.testing.assert_close(s16, s_same, atol=1e-5 * s_same.abs().max().item(), rtol=1e-5)
    torch.testing.assert_close(y16.float(), y_same, atol=1e-2 * y_same.abs().max().item(), rtol=1e-2)

    # Against fp32 on the unrounded inputs: loose, input rounding is ~3 significant digits.
    y32, s32 = ssd_chunked(chunk_size=32, **inp32)
    scale_y, scale_s = y32.abs().max().item(), s32.abs().max().item()
    assert (y16.float() - y32).abs().max().item() < 5e-2 * scale_y
    assert (s16 - s32).abs().max().item() < 5e-2 * scale_s
    rel = (y16.float() - y32).norm() / y32.norm()
    assert rel < 2e-2


def test_fp32_and_fp64_return_dtypes():
    for dtype in (torch.float32, torch.float64):
        inp = make_inputs(L=9, dtype=dtype, seed=42)
        for y, s in (ssd_ref(**inp), ssd_chunked(chunk_size=4, **inp)):
            assert y.dtype == dtype and s.dtype == dtype


@pytest.mark.parametrize("init", [False, True])
def test_recurrent_form_shares_the_signature_and_result(init):
    """``ssd_recurrent`` (a loop of ``ssd_step``) takes the arguments of ``ssd_ref`` / ``ssd_chunked``."""
    from bmojo.ops.ssd import ssd_recurrent

    inp = make_inputs(L=13, G=2, D=True, init=init, seed=5)
    y_ref, s_ref = ssd_ref(**inp)
    y, s = ssd_recurrent(chunk_size=4, **inp)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s, s_ref, rtol=1e-12, atol=1e-12)


def test_decay_prefix_sums_stay_full_precision_under_bf16_autocast():
    """Under ``torch.autocast`` a matmul of float32 tensors runs in bf16. The SSD's decay exponents are prefix sums
    written as triangular matmuls, so autocast would round them to 8 mantissa bits: every such matmul must run in
    its inputs' precision. Checked on each one (segsum and the chunk-start prefix sum inside ``ssd_chunked``) by
    recording the dtype of every matmul whose operand is a triangular ones matrix."""
    torch.manual_seed(0)
    a = -torch.rand(2, 3, 32, dtype=torch.float32) * 0.5
    exact = segsum(a)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = segsum(a)
    assert under.dtype == torch.float32
    torch.testing.assert_close(under, exact, rtol=0, atol=0)

    seen = []
    matmul = torch.Tensor.__matmul__

    def recording(x, y):
        out = matmul(x, y)
        square_ones = y.dim() == 2 and y.shape[0] == y.shape[1] and bool(((y == 0) | (y == 1)).all())
        if square_ones:  # a @ triu(ones): the chunk-start prefix sum
            seen.append(out.dtype)
        return out

    b, L, H, P, N = 1, 64, 2, 4, 8
    x, B, C = torch.randn(b, L, H, P), torch.randn(b, L, 1, N), torch.randn(b, L, 1, N)
    dt, A = torch.rand(b, L, H) * 0.5, -torch.rand(H) - 0.5
    y_exact, s_exact = ssd_chunked(x, dt, A, B, C, 16)
    try:
        torch.Tensor.__matmul__ = recording
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y_auto, s_auto = ssd_chunked(x, dt, A, B, C, 16)
    finally:
        torch.Tensor.__matmul__ = matmul
    assert seen and all(dtype == torch.float32 for dtype in seen)
    # The intra-chunk products may run in bf16 (mixed precision); the state, a product of decays, stays close.
    torch.testing.assert_close(s_auto, s_exact, rtol=5e-2, atol=5e-2)
