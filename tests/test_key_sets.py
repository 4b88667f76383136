"""The attention side of issue 11: per-head logit biases of the key sets (``key_set_bias``), the self fading key
(``fading_self_key``), the eidetic key distance and the memory's per-slot bias, in every attention form and in the
B'MOJO layer."""

import pytest
import torch
from test_attention import _inputs, _memory, _memory_ref

from bmojo import BMojoCache
from bmojo.layers.bmojo import SWA_EQUIVALENT_KEY_SET_BIAS
from bmojo.ops.attention import bmojo_attention_chunked, bmojo_attention_ref, bmojo_attention_step
from bmojo.ops.selection import EideticMemory
from support import tiny_model, tokens

pytestmark = pytest.mark.core

HEADS, KV_HEADS, DIM = 4, 2, 8


def _head_biases(seed=3, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return {
        name: (2 * torch.randn(HEADS, generator=g, dtype=dtype)).requires_grad_()
        for name in ("fading_bias", "self_bias", "eidetic_bias")
    }


def _op_case(length, window, chunk, *, fading=True, eidetic=True, biases=True, padded=False, dtype=torch.float64):
    """Inputs of the chunked form and of the reference (their memories come from the two selection forms)."""
    t = _inputs(2, length, HEADS, KV_HEADS, DIM, dtype=dtype)
    key_mask = None
    if padded:
        key_mask = torch.ones(2, length, dtype=torch.bool)
        key_mask[1, length - 5 :] = False
        key_mask[1, 2] = False
    memory = memory_ref = None
    if eidetic:
        memory, scores = _memory(t, chunk, 2, 3, key_mask)
        memory_ref = _memory_ref(t, scores, chunk, 2, 3)
    kf, vf = (t["k_fade"], t["v_fade"]) if fading else (None, None)
    options = _head_biases(dtype=dtype) if biases else {}
    options.pop("self_bias", None)
    common = dict(window=window, chunk_size=chunk, k_fade=kf, v_fade=vf, q_eid=t["q_eid"], key_mask=key_mask)
    return t, common, memory, memory_ref, options


def _grads(out, inputs, weight):
    grads = torch.autograd.grad((out * weight).sum(), inputs, allow_unused=True, retain_graph=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]


# --- key-set biases: the op -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("sdpa", [True, False])
@pytest.mark.parametrize("length,window,chunk,fading,eidetic,padded", [
    (37, 8, 4, True, True, True), (29, 4, 4, True, False, False), (50, 8, 8, False, True, True),
])  # fmt: skip
def test_biased_chunked_matches_reference(sdpa, length, window, chunk, fading, eidetic, padded):
    """Outputs and gradients (inputs and the biases) of both chunked paths equal the dense reference."""
    t, common, memory, memory_ref, options = _op_case(length, window, chunk, fading=fading, eidetic=eidetic,
                                                      padded=padded)
    ref = bmojo_attention_ref(t["q"], t["k"], t["v"], memory=memory_ref, **common, **options)
    out = bmojo_attention_chunked(t["q"], t["k"], t["v"], memory=memory, **common, **options, sdpa=sdpa)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    names = ["q", "k", "v"] + (["k_fade", "v_fade"] if fading else []) + (["q_eid", "k_eid"] if eidetic else [])
    inputs = [t[n] for n in names] + list(options.values())
    weight = torch.randn_like(ref)
    for name, a, b in zip(names + list(options), _grads(out, inputs, weight), _grads(ref, inputs, weight)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=f"gradient of {name}")
    if fading:
        assert _grads(ref, [options["fading_bias"]], weight)[0].abs().min() > 0  # every head's bias is used


def test_biases_shift_each_head_by_its_own_amount():
    """The mechanism, per head: a fading bias b_h multiplies head h's fading weights by exp(b_h) against the
    window's, so raising head 0's bias moves head 0's output only."""
    t, common, _, _, _ = _op_case(40, 8, 4, eidetic=False, biases=False)
    common.pop("q_eid")
    zero = torch.zeros(HEADS, dtype=torch.float64)
    base = bmojo_attention_chunked(t["q"], t["k"], t["v"], **common, fading_bias=zero)
    torch.testing.assert_close(base, bmojo_attention_chunked(t["q"], t["k"], t["v"], **common), rtol=0, atol=1e-15)
    raised_bias = zero.clone()
    raised_bias[0] = 3.0
    raised = bmojo_attention_chunked(t["q"], t["k"], t["v"], **common, fading_bias=raised_bias)
    moved = (raised - base).abs().amax(dim=(0, 1, 3))
    assert moved[0] > 1e-3 and moved[1:].max() == 0


@pytest.mark.parametrize("sdpa", [True, False])
def test_a_bias_never_unmasks_a_key(sdpa):
    """Masked entries keep exactly zero weight under any bias: a fading value outside [i-2W+1, i-W] and a padded
    key have no effect on query i, however large the fading bias."""
    length, window, j = 40, 8, 11
    t, common, _, _, _ = _op_case(length, window, 4, eidetic=False, biases=False)
    common.pop("q_eid")
    common["key_mask"] = torch.ones(2, length, dtype=torch.bool)
    common["key_mask"][:, 30] = False
    big = torch.full((HEADS,), 50.0, dtype=torch.float64)
    base = bmojo_attention_chunked(t["q"], t["k"], t["v"], **common, fading_bias=big, sdpa=sdpa)
    v_fade = t["v_fade"].detach().clone()
    v_fade[:, j] += 1.0
    v_fade[:, 30] += 1.0  # padding: never visible
    common["v_fade"] = v_fade
    moved = bmojo_attention_chunked(t["q"], t["k"], t["v"], **common, fading_bias=big, sdpa=sdpa)
    changed = (moved - base).abs().amax(dim=(2, 3))[0] > 0
    expected = torch.tensor([j + window <= i <= j + 2 * window - 1 for i in range(length)])
    assert torch.equal(changed, expected)


def _ring_decode(t, window, chunk, memory, fading, options, self_key=False):
    """Decode every position with the step form (a 2W ring, the chunk-wise memory) -> ``[B, L, H, D]``."""
    bsz, length, kv, d = t["k"].shape
    ring = 2 * window
    ring_k, ring_v, ring_kf, ring_vf = (torch.zeros(bsz, ring, kv, d, dtype=t["k"].dtype) for _ in range(4))
    ring_pos = torch.full((bsz, ring), -1)
    outs = []
    for i in range(length):
        slot = i % ring
        ring_k[:, slot], ring_v[:, slot], ring_pos[:, slot] = t["k"][:, i], t["v"][:, i], i
        ring_kf[:, slot], ring_vf[:, slot] = t["k_fade"][:, i], t["v_fade"][:, i]
        mem = None if memory is None else EideticMemory(*(None if m is None else m[:, i // chunk] for m in memory))
        extra = dict(k_self=t["k_fade"][:, i], v_self=t["v_fade"][:, i]) if self_key else {}
        outs.append(bmojo_attention_step(
            t["q"][:, i], torch.full((bsz,), i), ring_k, ring_v, ring_pos, window,
            ring_kf if fading else None, ring_vf if fading else None, t["q_eid"][:, i], mem, **options, **extra,
        ))  # fmt: skip
    return torch.stack(outs, dim=1)


def test_biased_step_matches_reference():
    t, common, memory, memory_ref, options = _op_case(45, 8, 4)
    common.pop("key_mask")
    ref = bmojo_attention_ref(t["q"], t["k"], t["v"], memory=memory_ref, **common, **options)
    with torch.no_grad():
        out = _ring_decode(t, 8, 4, memory, True, options)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


# --- key-set biases: the layer --------------------------------------------------------------------------------------
def test_key_set_bias_parameters_per_head():
    model = tiny_model(key_set_bias=True, key_set_bias_init=-2.5, fading_self_key=True)
    mixer = model.model.layers[0].mixer
    for name in ("fading_bias", "self_fading_bias", "eidetic_bias"):
        param = getattr(mixer, name)
        assert param.shape == (model.config.num_attention_heads,) and bool((param == -2.5).all()), name
    bare = tiny_model(key_set_bias=True, use_fading=False, memory_size=0).model.layers[0].mixer
    assert not any("bias" in n for n, _ in bare.named_parameters(recurse=False))  # only sets the layer has
    assert not any("bias" in n for n, _ in tiny_model().model.layers[0].mixer.named_parameters(recurse=False))


def test_very_negative_key_set_bias_is_sliding_window_attention():
    """At ``SWA_EQUIVALENT_KEY_SET_BIAS`` a B'MOJO model (fading keys and eidetic memory on) computes, in float32,
    what the sliding-window attention model with the same q/k/v/o weights computes: the start ``bmojo convert``
    relies on. Parallel forward and decoding, on inputs long enough for both memories to be visible."""
    bm = tiny_model(dtype=torch.float32, key_set_bias=True, key_set_bias_init=SWA_EQUIVALENT_KEY_SET_BIAS)
    with torch.no_grad():  # scores far larger than at init (std 0.02): here a bias of -20 would miss 1e-5, -30 not
        for layer in bm.model.layers:
            layer.mixer.q_proj.weight.mul_(15)
            layer.mixer.k_proj.weight.mul_(15)
    swa = tiny_model(dtype=torch.float32, layers_block_type=["attention", "attention"])
    missing, unexpected = swa.load_state_dict(bm.state_dict(), strict=False)
    assert not missing and all(".ssm." in n or "bias" in n or "innovation" in n for n in unexpected), unexpected
    x = tokens(2, 48)
    with torch.no_grad():
        out, expect = bm(x).logits, swa(x).logits
        torch.testing.assert_close(out, expect, rtol=0, atol=1e-5)
        cache = BMojoCache.empty(bm.config, 2, dtype=torch.float32)
        stepped = torch.cat([bm(x[:, t : t + 1], cache=cache).logits for t in range(x.shape[1])], dim=1)
        torch.testing.assert_close(stepped, expect, rtol=0, atol=1e-5)
        # Not by accident: at bias 0 the same weights compute something else.
        for layer in bm.model.layers:
            for name in ("fading_bias", "eidetic_bias"):
                getattr(layer.mixer, name).zero_()
        assert (bm(x).logits - expect).abs().max() > 1e-3
