"""The chunked attention's fused form: every key set (window, fading, self, eidetic) of a chunk under one softmax,
scored by two matmuls and weighed by one, equal to scoring each set separately (``joint_softmax``,
``fused=False``); a masked key never reaches a query, also when it is not finite."""

import pytest
import torch
from test_attention import CASES, _inputs, _memory

import bmojo.ops.attention.chunk as chunk_mod
from bmojo.ops.attention import bmojo_attention_chunked

pytestmark = pytest.mark.core


def _case(length, window, chunk, fading, eidetic, heads, kv_heads, padded, dtype):
    t = _inputs(2, length, heads, kv_heads, 8, dtype=dtype)
    key_mask = None
    if padded:
        key_mask = torch.ones(2, length, dtype=torch.bool)
        key_mask[1, length - 5 :] = False
        key_mask[1, 2] = False
    memory = _memory(t, chunk, 2, 3, key_mask)[0] if eidetic else None
    kf, vf = (t["k_fade"], t["v_fade"]) if fading else (None, None)
    args = (t["q"], t["k"], t["v"], window, chunk, kf, vf, t["q_eid"], memory)
    names = ["q", "k", "v"] + (["k_fade", "v_fade"] if fading else []) + (["q_eid", "k_eid"] if eidetic else [])
    return t, args, key_mask, names


@pytest.mark.parametrize("length,window,chunk,fading,eidetic,heads,kv_heads", CASES)
@pytest.mark.parametrize("padded", [False, True])
def test_fused_equals_separate_sets_fp32(length, window, chunk, fading, eidetic, heads, kv_heads, padded):
    t, args, key_mask, names = _case(length, window, chunk, fading, eidetic, heads, kv_heads, padded, torch.float32)
    one = bmojo_attention_chunked(*args, key_mask=key_mask, fused=True)
    sep = bmojo_attention_chunked(*args, key_mask=key_mask, fused=False)
    torch.testing.assert_close(one, sep, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(one)
    g_one = torch.autograd.grad((one * grad).sum(), [t[n] for n in names], allow_unused=True, retain_graph=True)
    g_sep = torch.autograd.grad((sep * grad).sum(), [t[n] for n in names], allow_unused=True)
    for name, a, b in zip(names, g_one, g_sep):
        a = torch.zeros_like(t[name]) if a is None else a
        b = torch.zeros_like(t[name]) if b is None else b
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"gradient of {name}")


@pytest.mark.parametrize(
    "fading,eidetic,padded,window",
    [(True, True, True, 8), (True, False, False, 8), (False, False, True, 8), (False, False, False, 8),
     (False, False, False, 64)],
)
def test_one_softmax_per_layer(monkeypatch, fading, eidetic, padded, window):
    """The mechanism: one softmax over every key set, the rotated queries' keys scored by one matmul and the memory
    by one more, one matmul over the concatenated values (no per-set softmax, no per-head key copies); full causal
    attention without padding is one ``is_causal`` SDPA call over the whole sequence instead."""
    calls = {"sdpa": [], "softmax": 0, "matmul": 0}
    real_sdpa, real_softmax, real_matmul = chunk_mod.F.scaled_dot_product_attention, torch.softmax, torch.matmul

    def sdpa(*a, **kw):
        calls["sdpa"].append(kw.get("is_causal", False))
        return real_sdpa(*a, **kw)

    def softmax(*a, **kw):
        calls["softmax"] += 1
        return real_softmax(*a, **kw)

    def matmul(*a, **kw):
        calls["matmul"] += 1
        return real_matmul(*a, **kw)

    monkeypatch.setattr(chunk_mod.F, "scaled_dot_product_attention", sdpa)
    monkeypatch.setattr(chunk_mod.torch, "softmax", softmax)
    monkeypatch.setattr(chunk_mod.torch, "matmul", matmul)
    monkeypatch.setattr(chunk_mod, "joint_softmax", None)  # the separate-sets form must not run
    _, args, key_mask, _ = _case(37, window, 4, fading, eidetic, 4, 2, padded, torch.float32)
    bmojo_attention_chunked(*args, key_mask=key_mask)
    if window >= 40 and not padded:
        assert calls == {"sdpa": [True], "softmax": 0, "matmul": 0}
    else:
        assert calls == {"sdpa": [], "softmax": 1, "matmul": 3 if eidetic else 2}


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("where", ["context", "fading", "memory"])
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_a_masked_non_finite_key_reaches_no_query(fused, where, bad):
    """A non-finite key (in-context, fading, or a memory slot) changes only the outputs of the queries that see it:
    every other query's output equals the clean one. (Masked scores are replaced, not added to: an additive mask
    gives ``nan + min = nan`` for every query of a chunk whose key window holds the key.)"""
    length, window, chunk = 37, 8, 4
    t, args, _, _ = _case(length, window, chunk, True, True, 4, 2, False, torch.float64)
    clean = bmojo_attention_chunked(*args, fused=fused)
    q, k, v, _, _, k_fade, v_fade, q_eid, memory = args
    pos = 13
    if where == "context":
        k = k.clone()
        k[0, pos, 1] = bad
        sees = lambda i: pos <= i < pos + window  # noqa: E731
    elif where == "fading":
        k_fade = k_fade.clone()
        k_fade[0, pos, 1] = bad
        sees = lambda i: pos + window <= i < pos + 2 * window  # noqa: E731
    else:  # a valid slot of one chunk's memory: seen by that chunk's queries at least W past the slot
        c, m = 6, int(memory.valid[0, 6].nonzero()[0])
        mem_k = memory.k.clone()
        mem_k[0, c, m, 1] = bad
        memory = memory._replace(k=mem_k)
        slot = int(memory.pos[0, c, m])
        sees = lambda i: i // chunk == c and slot <= i - window  # noqa: E731
    dirty = bmojo_attention_chunked(q, k, v, window, chunk, k_fade, v_fade, q_eid, memory, fused=fused)
    seen = torch.tensor([sees(i) for i in range(length)])
    assert seen.any() and not seen.all()
    torch.testing.assert_close(dirty[1], clean[1], rtol=0, atol=0)  # the other example
    torch.testing.assert_close(dirty[0, ~seen], clean[0, ~seen], rtol=1e-12, atol=1e-12)
    assert not torch.isfinite(dirty[0, seen]).all() or bad == float("-inf")  # the corruption did happen


@pytest.mark.parametrize("heads_first", [False, True])
def test_concatenated_windows_equal_slices_and_their_gradient(heads_first):
    """``_concat_windows`` (one copy into the fused op's layout, a backward that adds each slice's gradient into one
    buffer) equals concatenating the shifted slices with autograd's own backward: sets of spans 1, 3 and 5 and a set
    of ``M`` rows per chunk (the memory's values), float64."""
    g = torch.Generator().manual_seed(0)
    count, chunk, slots = 6, 4, 3
    sets = [(torch.randn(2, count + span - 1, rows, 3, 5, generator=g, dtype=torch.float64, requires_grad=True), span)
            for span, rows in ((3, chunk), (5, chunk), (1, chunk), (1, slots))]
    got = chunk_mod._concat_windows(sets, heads_first=heads_first)
    pieces = [xb[:, j : j + count] for xb, span in sets for j in range(span)]
    want = torch.cat(pieces, dim=2)
    if heads_first:
        want = want.permute(0, 3, 1, 2, 4)
    assert got.shape == want.shape and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    weight = torch.randn(want.shape, generator=g, dtype=torch.float64)
    inputs = [xb for xb, _ in sets]
    g_got = torch.autograd.grad((got * weight).sum(), inputs)
    g_want = torch.autograd.grad((want * weight).sum(), inputs)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_concatenated_windows_backward_allocates_one_gradient_per_input():
    """The mechanism behind ``_ConcatWindows``: its backward allocates each input's gradient once (the slices'
    gradients are added into it in place), where autograd's backward of the same concatenation of shifted slices
    allocates a zero-filled gradient of the whole input per slice (``span`` of them)."""
    g = torch.Generator().manual_seed(0)
    count, chunk, span = 32, 8, 5
    xb = torch.randn(1, count + span - 1, chunk, 4, 16, generator=g, requires_grad=True)
    weight = torch.randn(1, 4, count, span * chunk, 16, generator=g)

    def backward_bytes(out):
        loss = (out * weight).sum()
        with torch.profiler.profile(profile_memory=True) as prof:
            loss.backward()
        return sum(max(e.self_cpu_memory_usage, 0) for e in prof.events())

    ours = backward_bytes(chunk_mod._concat_windows([(xb, span)], heads_first=True))
    slices = torch.cat([xb[:, j : j + count].permute(0, 3, 1, 2, 4) for j in range(span)], dim=3)
    autograds = backward_bytes(slices)
    grad_bytes = xb.numel() * xb.element_size()
    out_bytes = weight.numel() * weight.element_size()  # the loss's gradient w.r.t. the output, in both
    assert ours <= out_bytes + 1.05 * grad_bytes
    assert autograds >= out_bytes + span * grad_bytes


@pytest.mark.parametrize("biased", [False, True])
def test_fused_softmax_runs_in_float32_under_bf16_autocast(monkeypatch, biased):
    """Under bf16 autocast the score matmuls return bf16; the masking and the softmax must still run in float32 (with
    and without key-set biases, whose float32 add would otherwise decide the precision), and the output stay close
    to the float32 one."""
    seen = []
    real_softmax = torch.softmax

    def softmax(x, *a, **kw):
        seen.append(x.dtype)
        return real_softmax(x, *a, **kw)

    _, args, key_mask, _ = _case(37, 8, 4, True, True, 4, 2, True, torch.float32)
    options = {}
    if biased:
        g = torch.Generator().manual_seed(1)
        options = {name: torch.randn(4, generator=g) for name in ("fading_bias", "eidetic_bias")}
    want = bmojo_attention_chunked(*args, key_mask=key_mask, **options)
    monkeypatch.setattr(chunk_mod.torch, "softmax", softmax)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = bmojo_attention_chunked(*args, key_mask=key_mask, **options)
    assert seen == [torch.float32]
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05)
