"""The attention side of issue 11: per-head logit biases of the key sets (``key_set_bias``), the self fading key
(``fading_self_key``), the eidetic key distance and the memory's per-slot bias, in every attention form and in the
B'MOJO layer."""

import pytest
import torch
from test_attention import _inputs, _memory, _memory_ref

from bmojo import BMojoCache
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
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("length,window,chunk,fading,eidetic,padded", [
    (37, 8, 4, True, True, True), (29, 4, 4, True, False, False), (50, 8, 8, False, True, True),
])  # fmt: skip
def test_biased_chunked_matches_reference(fused, length, window, chunk, fading, eidetic, padded):
    """Outputs and gradients (inputs and the biases) of both chunked paths equal the dense reference."""
    t, common, memory, memory_ref, options = _op_case(length, window, chunk, fading=fading, eidetic=eidetic,
                                                      padded=padded)
    ref = bmojo_attention_ref(t["q"], t["k"], t["v"], memory=memory_ref, **common, **options)
    out = bmojo_attention_chunked(t["q"], t["k"], t["v"], memory=memory, **common, **options, fused=fused)
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


@pytest.mark.parametrize("fused", [True, False])
def test_a_bias_never_unmasks_a_key(fused):
    """Masked entries keep exactly zero weight under any bias: a fading value outside [i-2W+1, i-W] and a padded
    key have no effect on query i, however large the fading bias."""
    length, window, j = 40, 8, 11
    t, common, _, _, _ = _op_case(length, window, 4, eidetic=False, biases=False)
    common.pop("q_eid")
    common["key_mask"] = torch.ones(2, length, dtype=torch.bool)
    common["key_mask"][:, 30] = False
    big = torch.full((HEADS,), 50.0, dtype=torch.float64)
    base = bmojo_attention_chunked(t["q"], t["k"], t["v"], **common, fading_bias=big, fused=fused)
    v_fade = t["v_fade"].detach().clone()
    v_fade[:, j] += 1.0
    v_fade[:, 30] += 1.0  # padding: never visible
    common["v_fade"] = v_fade
    moved = bmojo_attention_chunked(t["q"], t["k"], t["v"], **common, fading_bias=big, fused=fused)
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
    bare = tiny_model(key_set_bias=True, use_fading=False, memory_size=0, fading_self_key=False).model.layers[0].mixer
    assert not any("bias" in n for n, _ in bare.named_parameters(recurse=False))  # only sets the layer has
    v0 = tiny_model(key_set_bias=False).model.layers[0].mixer
    assert not any("bias" in n for n, _ in v0.named_parameters(recurse=False))
    # the defaults (issue 11): all three sets, starting neutral at key_set_bias_init = 0
    default = tiny_model().model.layers[0].mixer
    for name in ("fading_bias", "self_fading_bias", "eidetic_bias"):
        assert bool((getattr(default, name) == 0.0).all()), name




# --- self fading key: the op ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("length,window,chunk,fading,eidetic,padded", [
    (37, 8, 4, True, True, True), (23, 8, 4, False, False, False), (10, 64, 16, False, False, False),
])  # fmt: skip
def test_self_fading_key_chunked_matches_reference(fused, length, window, chunk, fading, eidetic, padded):
    """The self key (query i's own fading token) in both chunked paths == the reference: outputs and gradients
    (the self key and value, the self bias). Also without other key sets and with a window covering everything."""
    t, common, memory, memory_ref, options = _op_case(length, window, chunk, fading=fading, eidetic=eidetic,
                                                      padded=padded)
    options["self_bias"] = _head_biases()["self_bias"]
    k_self, v_self = (x.detach().flip(1).requires_grad_() for x in (t["k_fade"], t["v_fade"]))
    options.update(k_self=k_self, v_self=v_self)
    ref = bmojo_attention_ref(t["q"], t["k"], t["v"], memory=memory_ref, **common, **options)
    out = bmojo_attention_chunked(t["q"], t["k"], t["v"], memory=memory, **common, **options, fused=fused)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    names = ["q", "k", "v"] + list(options)
    inputs = [t[n] for n in names[:3]] + list(options.values())
    weight = torch.randn_like(ref)
    grads_ref = _grads(ref, inputs, weight)
    for name, a, b in zip(names, _grads(out, inputs, weight), grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=f"gradient of {name}")
    assert grads_ref[names.index("v_self")].abs().amin(dim=(2, 3)).min() > 0  # every query reads its own value


def test_self_fading_key_is_each_querys_own_token_at_distance_zero():
    """Changing the self value of position j moves query j's output only; the self score does not depend on where
    the pair sits (both rotated at i: distance 0)."""
    from bmojo.ops.rope import apply_rope, rope_cos_sin

    length, j = 20, 9
    t, common, _, _, _ = _op_case(length, 8, 4, fading=False, eidetic=False, biases=False)
    common = dict(window=8, chunk_size=4)
    base = bmojo_attention_chunked(t["q"], t["k"], t["v"], **common, k_self=t["k_fade"], v_self=t["v_fade"])
    v_self = t["v_fade"].detach().clone()
    v_self[:, j] += 1.0
    moved = bmojo_attention_chunked(t["q"], t["k"], t["v"], **common, k_self=t["k_fade"], v_self=v_self)
    changed = (moved - base).abs().amax(dim=(0, 2, 3)) > 0
    assert torch.equal(changed, torch.arange(length) == j)
    # One query/self-key pair, rotated at position 0 or 13: the same score, so the same attention weight.
    q, ks = t["q"][:1, :1].detach(), t["k_fade"][:1, :1].detach()
    k0 = torch.zeros(1, 1, KV_HEADS, DIM, dtype=torch.float64)
    outs = []
    for pos in (0, 13):
        cos, sin = rope_cos_sin(torch.tensor([[pos]]), DIM, 10000.0, torch.float64)
        rot = lambda x: apply_rope(x, cos, sin)  # noqa: E731
        outs.append(bmojo_attention_ref(rot(q), rot(k0), k0, 8, k_self=rot(ks), v_self=t["v_fade"][:1, :1]))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)


def test_self_fading_key_step_matches_reference():
    t, common, memory, memory_ref, options = _op_case(45, 8, 4)
    common.pop("key_mask")
    options["self_bias"] = _head_biases()["self_bias"]
    ref = bmojo_attention_ref(t["q"], t["k"], t["v"], memory=memory_ref, **common, **options,
                              k_self=t["k_fade"], v_self=t["v_fade"])
    with torch.no_grad():
        out = _ring_decode(t, 8, 4, memory, True, options, self_key=True)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


# --- self fading key: the layer (the Mamba-2 special case is in tests/test_model.py) -------------------------------
def test_self_fading_key_without_fading_keys_still_runs_the_ssm():
    model = tiny_model(use_fading=False, memory_size=0, fading_self_key=True)
    assert model.model.layers[0].mixer.ssm is not None
    plain = tiny_model(use_fading=False, memory_size=0, fading_self_key=False)  # v0: no self key
    plain.load_state_dict(model.state_dict(), strict=False)
    x = tokens(1, 30)
    with torch.no_grad():
        assert (model(x).logits - plain(x).logits).abs().max() > 1e-4


@pytest.mark.parametrize("options", [
    dict(fading_self_key=True),
    dict(fading_self_key=True, key_set_bias=True, key_set_bias_init=-1.0),
    dict(fading_self_key=True, use_fading=False, memory_size=0),
    dict(eidetic_key_distance="zero"),
    dict(eidetic_key_distance="zero", fading_self_key=True, key_set_bias=True, key_set_bias_init=-1.0),
])  # fmt: skip
def test_decoding_equals_parallel_forward_with_the_attention_options(options):
    """fp64, across chunk boundaries and memory eviction (as tests/test_model.py's decoding test), and a prefill
    split in the middle of a chunk."""
    model = tiny_model(**options)
    if options.get("key_set_bias"):
        with torch.no_grad():  # distinct per-head values, so the step form's head layout is checked too
            for name, param in model.named_parameters():
                if name.endswith(("fading_bias", "eidetic_bias")):
                    param.add_(torch.linspace(-1, 1, param.shape[0], dtype=param.dtype))
    cfg = model.config
    length = 2 * cfg.window_size + 6 * cfg.chunk_size + 3
    x = tokens(2, length)
    with torch.no_grad():
        parallel = model(x).logits
        cache = BMojoCache.empty(cfg, 2, dtype=torch.float64)
        stepped = torch.cat([model(x[:, t : t + 1], cache=cache).logits for t in range(length)], 1)
        torch.testing.assert_close(stepped, parallel, rtol=1e-12, atol=1e-12)
        prefill = model(x[:, :13], use_cache=True)
        rest = model(x[:, 13:], cache=prefill.cache).logits
        torch.testing.assert_close(torch.cat([prefill.logits, rest], 1), parallel, rtol=1e-12, atol=1e-12)


def test_chunked_model_equals_reference_model_with_the_attention_options():
    """The whole model with every attention option on: chunked ops == references, outputs and parameter
    gradients (the key-set biases included)."""
    from bmojo.ops import use_backend

    model = tiny_model(fading_self_key=True, key_set_bias=True, key_set_bias_init=-0.5, eidetic_key_distance="zero")
    x = tokens(2, 38)
    out = model(x, labels=x)
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(out.loss, list(params.values()), allow_unused=True)
    with use_backend("reference"):
        ref = model(x, labels=x)
        ref_grads = torch.autograd.grad(ref.loss, list(params.values()), allow_unused=True)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-10, atol=1e-10)
    for name, a, b in zip(params, grads, ref_grads):
        if a is None and b is None:
            continue
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10, msg=name)
    for name in ("fading_bias", "self_fading_bias", "eidetic_bias"):
        assert grads[list(params).index(f"model.layers.0.mixer.{name}")].abs().min() > 0, name


# --- eidetic key distance -------------------------------------------------------------------------------------------
def _eidetic_scores_of_matches(distance, monkeypatch):
    """One layer with ``q_proj = k_proj`` (so a token's query equals its key) over a 3-token alphabet: the eidetic
    score ``q_eid . k_mem`` of every visible slot holding the query's own token, by head, and ``|k|^2`` of it."""
    import bmojo.layers.common as mixer_common  # the mixers run their sequence ops through run_op, which dispatches

    model = tiny_model(layers_block_type=["bmojo"], num_hidden_layers=1, num_key_value_heads=4,
                       eidetic_key_distance=distance)
    mixer = model.model.layers[0].mixer
    with torch.no_grad():
        mixer.q_proj.weight.copy_(mixer.k_proj.weight)
    seen = {}
    real = mixer_common.dispatch

    def capture(op):
        fn = real(op)
        if op != "attention":  # the SSD op goes through the same place
            return fn

        def run(q, k, v, window, chunk, k_fade, v_fade, q_eid, memory, **kw):
            seen.update(q_eid=q_eid, memory=memory, k=k)
            return fn(q, k, v, window, chunk, k_fade, v_fade, q_eid, memory, **kw)

        return run

    monkeypatch.setattr(mixer_common, "dispatch", capture)
    x = tokens(1, 60, vocab=6)
    with torch.no_grad():
        model(x)
    cfg = model.config
    q_eid, mem = seen["q_eid"][0], seen["memory"]
    scores, norms, which = [], [], []
    for i in range(x.shape[1]):
        c = i // cfg.chunk_size
        for m in range(cfg.memory_size):
            pos = int(mem.pos[0, c, m])
            if bool(mem.valid[0, c, m]) and pos <= i - cfg.window_size and x[0, pos] == x[0, i]:
                scores.append((q_eid[i] * mem.k[0, c, m]).sum(-1))  # [H] (Hkv = H)
                norms.append(seen["k"][0, pos].pow(2).sum(-1))
                which.append(int(x[0, i]))
    assert len({int(x[0, int(p)]) for p in mem.pos[0].flatten()}) > 1 and len(scores) > 10  # several tokens, pairs
    return torch.stack(scores), torch.stack(norms), torch.tensor(which)


def test_zero_eidetic_key_distance_scores_an_exact_content_match_the_same_everywhere(monkeypatch):
    """``"zero"``: an eidetic slot holding the query's own token scores exactly ``|k|^2`` (unrotated query against
    unrotated key), the same for every pair of positions; ``"window"`` scores the same pair rotated by ``2W``."""
    zero, norms, which = _eidetic_scores_of_matches("zero", monkeypatch)
    torch.testing.assert_close(zero, norms, rtol=1e-12, atol=1e-12)
    for token in which.unique():  # one score per token, whichever positions the query and the slot hold
        same = zero[which == token]
        torch.testing.assert_close(same, same[:1].expand_as(same), rtol=1e-12, atol=1e-12)
    window, _, _ = _eidetic_scores_of_matches("window", monkeypatch)
    assert (window - norms).abs().max() > 1e-6  # the 2W rotation: not the content match


# --- the memory's per-slot bias (EideticMemory.bias) ----------------------------------------------------------------
def _with_slot_bias(memory, table):
    """``memory`` whose slots carry ``bias = table[b, pos]`` (the same bias per token, whatever slot it sits in)."""
    flat = memory.pos.flatten(1)
    return memory._replace(bias=torch.gather(table, 1, flat).view_as(memory.pos))


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("head_biases", [False, True])
def test_memory_slot_bias_chunked_and_step_match_reference(fused, head_biases):
    """``memory.bias`` adds to each slot's logit in every form: outputs and gradients (the bias included) equal the
    reference's; the step form too. With and without the per-head eidetic bias."""
    length, window, chunk = 45, 8, 4
    t, common, memory, memory_ref, options = _op_case(length, window, chunk, padded=True, biases=head_biases)
    table = (3 * torch.randn(2, length, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
    table.requires_grad_()
    memory, memory_ref = _with_slot_bias(memory, table), _with_slot_bias(memory_ref, table)
    ref = bmojo_attention_ref(t["q"], t["k"], t["v"], memory=memory_ref, **common, **options)
    out = bmojo_attention_chunked(t["q"], t["k"], t["v"], memory=memory, **common, **options, fused=fused)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    names = ["q", "k_eid", "v", "table"] + list(options)
    inputs = [t["q"], t["k_eid"], t["v"], table] + list(options.values())
    weight = torch.randn_like(ref)
    grads_ref = _grads(ref, inputs, weight)
    for name, a, b in zip(names, _grads(out, inputs, weight), grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=f"gradient of {name}")
    assert (grads_ref[3] != 0).sum() >= 4  # the slot bias is trained through the slots that were seen
    plain = bmojo_attention_ref(t["q"], t["k"], t["v"], memory=memory_ref._replace(bias=None), **common, **options)
    assert (plain - ref).abs().max() > 1e-3  # and it matters
    if fused:
        common.pop("key_mask")
        ref = bmojo_attention_ref(t["q"], t["k"], t["v"], memory=memory_ref, **common, **options)
        with torch.no_grad():
            stepped = _ring_decode(t, window, chunk, memory, True, options)
        torch.testing.assert_close(stepped, ref, rtol=1e-10, atol=1e-10)


# --- the nki backend declines the new options ----------------------------------------------------------------------
def test_nki_backend_declines_each_new_option_and_logs_the_fallback(monkeypatch, caplog):
    """With the kernels available (the stand-in), a call the kernels support runs them; the same call with a
    key-set bias, the self fading key, a slot bias or a query range runs the chunked form, the reason logged once."""
    import logging

    from bmojo.ops import dispatch, registry, use_backend
    from bmojo.ops.attention import nki_backend

    monkeypatch.setenv("BMOJO_NKI_STANDIN", "1")
    calls = []
    apply = nki_backend.AttentionNKI.apply
    monkeypatch.setattr(nki_backend.AttentionNKI, "apply", lambda *a: calls.append(1) or apply(*a))
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    length, window, chunk = 256, 128, 128
    q, k, v, kf, vf, qe = r(1, length, 2, 16), r(1, length, 1, 16), r(1, length, 1, 16), r(1, length, 1, 16), \
        r(1, length, 1, 16), r(1, length, 2, 16)
    memory = EideticMemory(r(1, 2, 4, 1, 16), r(1, 2, 4, 1, 16), torch.zeros(1, 2, 4, dtype=torch.long),
                           torch.ones(1, 2, 4))
    head = torch.full((2,), -1.0)
    cases = [
        (dict(fading_bias=head), memory, "fading_bias"),
        (dict(self_bias=head, k_self=kf, v_self=vf), memory, "self_bias, k_self"),
        (dict(eidetic_bias=head), memory, "eidetic_bias"),
        ({}, memory._replace(bias=torch.zeros(1, 2, 4)), "memory.bias"),
        (dict(query_range=(128, 256)), memory, "query_range"),
    ]
    args = (q, k, v, window, chunk, kf, vf, qe)
    with use_backend("nki"), caplog.at_level(logging.WARNING, logger=registry.__name__):
        monkeypatch.setattr(registry, "_warned", set())
        dispatch("attention")(*args, memory)
        assert calls == [1] and not caplog.records  # supported: the kernels ran
        for options, mem, used in cases:
            caplog.clear()
            monkeypatch.setattr(registry, "_warned", set())
            for _ in range(2):
                out = dispatch("attention")(*args, mem, **options)
            assert calls == [1], used  # the chunked form ran
            torch.testing.assert_close(out, bmojo_attention_chunked(*args, mem, **options), rtol=0, atol=0)
            why = f"{used}: the kernels take no key-set bias, self fading key, slot bias, document reset or query range"
            assert [rec.message for rec in caplog.records] == [
                f"backend 'nki' does not support these inputs ({why}) for op 'attention'; running the 'chunked' form"
            ]


def test_a_checkpoint_without_the_biases_loads_them_at_their_initial_value(tmp_path):
    """A model saved without ``key_set_bias`` (e.g. before it existed) loads into one with it: the new biases start
    at ``key_set_bias_init`` (transformers initialises what the checkpoint lacks), the rest is the checkpoint's."""
    from bmojo import BMojoForCausalLM

    tiny_model(dtype=torch.float32, key_set_bias=False).save_pretrained(tmp_path)  # v0: no key-set biases
    loaded = BMojoForCausalLM.from_pretrained(tmp_path, key_set_bias=True, key_set_bias_init=-30.0)
    mixer = loaded.model.layers[1].mixer
    assert bool((mixer.fading_bias == -30.0).all()) and bool((mixer.eidetic_bias == -30.0).all())
    saved = tiny_model(dtype=torch.float32, key_set_bias=False).model.layers[1].mixer
    assert torch.equal(mixer.q_proj.weight, saved.q_proj.weight)
