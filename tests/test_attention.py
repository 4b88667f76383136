"""Chunked and single-step B'MOJO attention against the dense reference."""

import pytest
import torch
import torch.nn.functional as F

from bmojo.ops.attention import bmojo_attention_chunked, bmojo_attention_ref, bmojo_attention_step
from bmojo.ops.selection import (
    EideticMemory,
    Slots,
    memory_per_chunk,
    select_per_chunk_ref,
    take_selected,
    topk_per_chunk,
)

# core: must also pass on the trn1 stack (torch 2.9 + transformers 4.57); the XLA tier runs it there too.
pytestmark = pytest.mark.core


def _inputs(bsz, length, heads, kv_heads, dim, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()

    return {
        "q": r(bsz, length, heads, dim),
        "k": r(bsz, length, kv_heads, dim),
        "v": r(bsz, length, kv_heads, dim),
        "k_fade": r(bsz, length, kv_heads, dim),
        "v_fade": r(bsz, length, kv_heads, dim),
        "q_eid": r(bsz, length, heads, dim),
        "k_eid": r(bsz, length, kv_heads, dim),
        "scores": torch.rand(bsz, length, generator=g, dtype=torch.float64).float(),
    }


def _memory(t, chunk, k_sel, capacity, key_mask=None):
    """Chunked memory (selection ops) for the eidetic keys ``k_eid`` and values ``v``."""
    scores = t["scores"] if key_mask is None else t["scores"].masked_fill(~key_mask, -1.0)
    onehot, cs, cp = topk_per_chunk(scores, chunk, k_sel)
    kv, d = t["k_eid"].shape[2:]
    cand = Slots(take_selected(onehot, t["k_eid"].flatten(-2)), take_selected(onehot, t["v"].flatten(-2)), cp, cs)
    seen, _ = memory_per_chunk(cand, capacity)
    return EideticMemory(seen.k.unflatten(-1, (kv, d)), seen.v.unflatten(-1, (kv, d)), seen.pos, seen.score), scores


def _memory_ref(t, scores, chunk, k_sel, capacity):
    """The same memory from the plain-loop reference policy (Python sorting), for the dense reference."""
    kv, d = t["k_eid"].shape[2:]
    _, seen = select_per_chunk_ref(scores, t["k_eid"].flatten(-2), t["v"].flatten(-2), chunk, k_sel, capacity)
    return seen._replace(k=seen.k.unflatten(-1, (kv, d)), v=seen.v.unflatten(-1, (kv, d)))


CASES = [
    # (length, window, chunk, fading, eidetic, heads, kv_heads)
    (37, 8, 4, True, True, 4, 2),
    (64, 16, 8, True, True, 2, 2),
    (50, 8, 8, False, True, 4, 1),
    (29, 4, 4, True, False, 2, 1),
    (23, 8, 4, False, False, 2, 2),
    (10, 64, 16, True, True, 2, 1),  # window longer than the sequence
]


@pytest.mark.parametrize("length,window,chunk,fading,eidetic,heads,kv_heads", CASES)
@pytest.mark.parametrize("padded", [False, True])
def test_chunked_matches_dense_reference(length, window, chunk, fading, eidetic, heads, kv_heads, padded):
    t = _inputs(2, length, heads, kv_heads, 8)
    key_mask = None
    if padded:  # row 1 is right-padded, and has a hole, to exercise arbitrary key masks
        key_mask = torch.ones(2, length, dtype=torch.bool)
        key_mask[1, length - 5 :] = False
        key_mask[1, 2] = False
    memory = memory_ref = None
    if eidetic:
        memory, scores = _memory(t, chunk, 2, 3, key_mask)
        memory_ref = _memory_ref(t, scores, chunk, 2, 3)
    kf, vf = (t["k_fade"], t["v_fade"]) if fading else (None, None)
    ref = bmojo_attention_ref(t["q"], t["k"], t["v"], window, chunk, kf, vf, t["q_eid"], memory_ref, key_mask=key_mask)
    out = bmojo_attention_chunked(t["q"], t["k"], t["v"], window, chunk, kf, vf, t["q_eid"], memory, key_mask=key_mask)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)

    grad = torch.randn_like(ref)
    names = ["q", "k", "v"] + (["k_fade", "v_fade"] if fading else []) + (["q_eid", "k_eid"] if eidetic else [])
    g_ref = torch.autograd.grad((ref * grad).sum(), [t[n] for n in names], allow_unused=True)
    g_out = torch.autograd.grad((out * grad).sum(), [t[n] for n in names], allow_unused=True)
    for name, a, b in zip(names, g_out, g_ref):
        # an unused input (e.g. no eidetic slot visible at all) has no gradient: that is a zero gradient
        a = torch.zeros_like(t[name]) if a is None else a
        b = torch.zeros_like(t[name]) if b is None else b
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=f"gradient of {name}")
        if name == "k_eid" and length > window + 2 * chunk:
            assert b.abs().sum() > 0, "the eidetic memory should be visible somewhere in this case"


def test_window_covering_everything_is_causal_sdpa():
    t = _inputs(2, 19, 4, 4, 8, dtype=torch.float32)
    out = bmojo_attention_chunked(t["q"], t["k"], t["v"], window=32, chunk_size=8)
    expect = F.scaled_dot_product_attention(
        t["q"].transpose(1, 2), t["k"].transpose(1, 2), t["v"].transpose(1, 2), is_causal=True
    ).transpose(1, 2)
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)


def test_sliding_window_is_banded_sdpa():
    length, window = 40, 8
    t = _inputs(1, length, 2, 2, 8, dtype=torch.float32)
    i, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
    band = (j <= i) & (j > i - window)
    out = bmojo_attention_chunked(t["q"], t["k"], t["v"], window=window, chunk_size=4)
    expect = F.scaled_dot_product_attention(
        t["q"].transpose(1, 2), t["k"].transpose(1, 2), t["v"].transpose(1, 2), attn_mask=band
    ).transpose(1, 2)
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)


def test_fading_keys_cover_exactly_the_span_that_left_the_window():
    """Perturbing one fading value changes exactly the queries i with j in [i-2W+1, i-W]."""
    length, window, j = 40, 8, 11
    t = _inputs(1, length, 2, 2, 8)
    base = bmojo_attention_chunked(t["q"], t["k"], t["v"], window, 4, t["k_fade"], t["v_fade"])
    v_fade = t["v_fade"].detach().clone()
    v_fade[0, j] += 1.0
    moved = bmojo_attention_chunked(t["q"], t["k"], t["v"], window, 4, t["k_fade"], v_fade)
    changed = (moved - base).abs().amax(dim=(2, 3))[0] > 0
    expected = torch.tensor([j + window <= i <= j + 2 * window - 1 for i in range(length)])
    assert torch.equal(changed, expected)


@pytest.mark.parametrize("fading,eidetic", [(True, True), (False, False), (True, False)])
def test_step_matches_reference(fading, eidetic):
    """Decoding with a ring buffer of 2W (or W) slots and the chunk-wise memory gives the dense result."""
    length, window, chunk, k_sel, capacity = 45, 8, 4, 2, 3
    t = _inputs(2, length, 4, 2, 8)
    memory = memory_ref = None
    if eidetic:
        memory, scores = _memory(t, chunk, k_sel, capacity)
        memory_ref = _memory_ref(t, scores, chunk, k_sel, capacity)
    kf, vf = (t["k_fade"], t["v_fade"]) if fading else (None, None)
    ref = bmojo_attention_ref(t["q"], t["k"], t["v"], window, chunk, kf, vf, t["q_eid"], memory_ref)
    ring = 2 * window if fading else window
    bsz, _, kv, d = t["k"].shape
    ring_k, ring_v = (
        torch.zeros(bsz, ring, kv, d, dtype=torch.float64),
        torch.zeros(bsz, ring, kv, d, dtype=torch.float64),
    )
    ring_kf, ring_vf = ring_k.clone(), ring_v.clone()
    ring_pos = torch.full((bsz, ring), -1)
    with torch.no_grad():
        for i in range(length):
            slot = i % ring
            ring_k[:, slot], ring_v[:, slot], ring_pos[:, slot] = t["k"][:, i], t["v"][:, i], i
            ring_kf[:, slot], ring_vf[:, slot] = t["k_fade"][:, i], t["v_fade"][:, i]
            mem = None
            if eidetic:
                c = i // chunk
                mem = EideticMemory(*(None if m is None else m[:, c] for m in memory))
            out = bmojo_attention_step(
                t["q"][:, i],
                torch.full((bsz,), i),
                ring_k,
                ring_v,
                ring_pos,
                window,
                ring_kf if fading else None,
                ring_vf if fading else None,
                t["q_eid"][:, i],
                mem,
            )
            torch.testing.assert_close(out, ref[:, i], rtol=1e-10, atol=1e-10, msg=f"position {i}")


def test_bf16_inputs_stay_close_to_fp32():
    t = _inputs(1, 33, 2, 2, 8, dtype=torch.float32)
    args = (t["q"], t["k"], t["v"], 8, 4, t["k_fade"], t["v_fade"])
    out32 = bmojo_attention_chunked(*args)
    out16 = bmojo_attention_chunked(*(a.bfloat16() if torch.is_tensor(a) else a for a in args))
    assert out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16.float(), out32, rtol=0.05, atol=0.05)
