"""The chunked attention's one-call form: every key set (window, fading, eidetic) of a chunk under one
``scaled_dot_product_attention`` call, equal to scoring each set separately (``joint_softmax``, ``sdpa=False``)."""

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
def test_one_call_equals_separate_sets_fp32(length, window, chunk, fading, eidetic, heads, kv_heads, padded):
    t, args, key_mask, names = _case(length, window, chunk, fading, eidetic, heads, kv_heads, padded, torch.float32)
    one = bmojo_attention_chunked(*args, key_mask=key_mask, sdpa=True)
    sep = bmojo_attention_chunked(*args, key_mask=key_mask, sdpa=False)
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
    [(True, True, True, 8), (False, False, True, 8), (False, False, False, 8), (False, False, False, 64)],
)
def test_one_attention_call_per_layer(monkeypatch, fading, eidetic, padded, window):
    """The mechanism: one ``scaled_dot_product_attention`` call scores every key set (no per-set softmax)."""
    calls = []
    real = chunk_mod.F.scaled_dot_product_attention

    def counting(*a, **kw):
        calls.append(kw.get("is_causal", False))
        return real(*a, **kw)

    monkeypatch.setattr(chunk_mod.F, "scaled_dot_product_attention", counting)
    monkeypatch.setattr(chunk_mod, "joint_softmax", None)  # the separate-sets form must not run
    _, args, key_mask, _ = _case(37, window, 4, fading, eidetic, 4, 2, padded, torch.float32)
    bmojo_attention_chunked(*args, key_mask=key_mask)
    # Full causal attention without padding is one is_causal call over the whole sequence.
    assert calls == [window >= 40 and not padded]
