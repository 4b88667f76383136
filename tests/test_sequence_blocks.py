"""The sequence ops in blocks (the model's ``sequence_block_size``). The attention op over a block of queries
(``query_range``) equals the whole op's slice, reads only the keys and memories its queries see and keeps
intermediates in proportion to its queries; the SSD op runs block after block from the state the previous block
ended with. The model computes the same losses and gradients in blocks, with and without selective recompute, and
runs (and recomputes) each op once per block."""

import pytest
import torch

from bmojo.ops.attention import bmojo_attention_chunked, bmojo_attention_ref
from support import tiny_model, tokens
from test_attention import _inputs, _memory

pytestmark = pytest.mark.core

# (length, window, chunk, fading, eidetic): a ragged last chunk, a block shorter than the window, no fading
CASES = [(37, 8, 4, True, True), (64, 16, 8, True, True), (50, 8, 8, False, True), (29, 4, 4, True, False)]


def _call_args(length, window, chunk, fading, eidetic, options, seed=0):
    t = _inputs(2, length, 4, 2, 8, seed=seed)
    key_mask = torch.ones(2, length, dtype=torch.bool)
    key_mask[1, length - 5 :] = False
    key_mask[1, 2] = False
    memory = None
    if eidetic:  # leaves of their own: the tests take gradients w.r.t. the slots
        memory = _memory(t, chunk, 2, 3, key_mask)[0]
        memory = memory._replace(k=memory.k.detach().requires_grad_(), v=memory.v.detach().requires_grad_())
    kwargs = dict(key_mask=key_mask)
    if options:  # every option the op has: key-set biases, a slot bias, the self fading key, document resets
        g = torch.Generator().manual_seed(seed + 1)
        kwargs.update(
            fading_bias=torch.randn(4, generator=g, dtype=torch.float64),
            self_bias=torch.randn(4, generator=g, dtype=torch.float64),
            eidetic_bias=torch.randn(4, generator=g, dtype=torch.float64),
            k_self=t["k_fade"].roll(1, 1),
            v_self=t["v_fade"].roll(1, 1),
            doc_start=torch.tensor([[0] * 10 + [10] * (length - 10), [0] * length]),
        )
        if memory is not None:
            memory = memory._replace(bias=torch.randn(memory.pos.shape, generator=g, dtype=torch.float64))
    kf, vf = (t["k_fade"], t["v_fade"]) if fading else (None, None)
    args = (t["q"], t["k"], t["v"], window, chunk, kf, vf, t["q_eid"] if eidetic else None, memory)
    return args, kwargs


def _ranges(length, block):
    return [(s, s + block) for s in range(0, length, block)]


@pytest.mark.parametrize("length,window,chunk,fading,eidetic", CASES)
@pytest.mark.parametrize("options", [False, True], ids=["plain", "every option"])
@pytest.mark.parametrize("fused", [True, False])
def test_each_block_equals_the_whole_ops_slice_in_value_and_gradient(length, window, chunk, fading, eidetic,
                                                                      options, fused):
    args, kwargs = _call_args(length, window, chunk, fading, eidetic, options)
    inputs = [a for a in args if isinstance(a, torch.Tensor)] + ([args[-1].k, args[-1].v] if eidetic else [])
    whole = bmojo_attention_chunked(*args, fused=fused, **kwargs)
    reference = bmojo_attention_ref(*args, **kwargs)
    torch.testing.assert_close(whole, reference, rtol=1e-10, atol=1e-10)
    weight = torch.randn(whole.shape, generator=torch.Generator().manual_seed(3), dtype=whole.dtype)
    want = torch.autograd.grad((whole * weight).sum(), inputs)
    for block in (chunk, 2 * chunk, 3 * chunk):  # one chunk, two, and blocks that do not divide the length
        parts = []
        for start, end in _ranges(length, block):
            part = bmojo_attention_chunked(*args, fused=fused, query_range=(start, end), **kwargs)
            assert part.shape == (2, min(end, length) - start, *whole.shape[2:])
            torch.testing.assert_close(part, whole[:, start:end], rtol=1e-12, atol=1e-12)
            ref_part = bmojo_attention_ref(*args, query_range=(start, end), **kwargs)
            torch.testing.assert_close(ref_part, reference[:, start:end], rtol=0, atol=0)
            parts.append(part)
        got = torch.autograd.grad((torch.cat(parts, 1) * weight).sum(), inputs)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_a_block_reads_only_the_keys_and_memories_its_queries_see():
    """Block [24, 36) of W=8 with fading keys sees positions [24 - 2W, 36) = [8, 36) and memories of chunks 6-8:
    everything else may change without changing it, and receives no gradient."""
    length, window, chunk = 50, 8, 4
    args, kwargs = _call_args(length, window, chunk, True, True, True)
    start, end = 24, 36
    out = bmojo_attention_chunked(*args, query_range=(start, end), **kwargs)
    q, k, v, _, _, kf, vf, qe, memory = args
    grads = torch.autograd.grad(out.sum(), [q, k, v, kf, vf, qe, memory.k, memory.v])
    seen = torch.zeros(length, dtype=torch.bool)
    seen[start - 2 * window : end] = True
    for name, g in zip(["k", "v", "k_fade", "v_fade"], grads[1:5]):
        assert g[:, ~seen].abs().max() == 0, name
        assert g[:, seen].abs().max() > 0, name
    for g in (grads[0], grads[5]):  # queries: only the block's own
        assert g[:, :start].abs().max() == 0 and g[:, end:].abs().max() == 0
    chunks = torch.zeros(memory.k.shape[1], dtype=torch.bool)
    chunks[start // chunk : end // chunk] = True
    for g in grads[6:]:
        assert g[:, ~chunks].abs().max() == 0 and g[:, chunks].abs().max() > 0

    def changed(x, keep):  # x with everything outside `keep` (a mask over dim 1) replaced by noise
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=x.dtype)
        shape = [1, -1] + [1] * (x.dim() - 2)
        return torch.where(keep.view(shape), x.detach(), noise)

    other = (changed(q, torch.arange(length).ge(start) & torch.arange(length).lt(end)), changed(k, seen),
             changed(v, seen), window, chunk, changed(kf, seen), changed(vf, seen), qe,
             memory._replace(k=changed(memory.k, chunks), v=changed(memory.v, chunks)))
    torch.testing.assert_close(bmojo_attention_chunked(*other, query_range=(start, end), **kwargs), out,
                               rtol=0, atol=0)


def test_a_blocks_intermediates_scale_with_its_queries():
    """What autograd keeps for one block of a quarter of the queries is about a quarter of the whole op's (plus the
    block's share of the shared inputs): the op builds its key windows, masks and scores per computed chunk."""
    length, window, chunk = 256, 16, 8
    args, kwargs = _call_args(length, window, chunk, True, True, True)

    def saved_bytes(**extra):
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            bmojo_attention_chunked(*args, **kwargs, **extra)
        return total[0]

    whole = saved_bytes()
    quarter = saved_bytes(query_range=(64, 128))
    assert quarter < 0.3 * whole


def test_a_query_range_off_the_chunk_grid_or_empty_is_one_value_error():
    args, kwargs = _call_args(37, 8, 4, True, True, False)
    empty = "must hold at least one of the 37 queries \\(0 <= start < end\\)"
    for bad, why in [((2, 8), "start must be a multiple of the chunk size 4"), ((40, 44), empty), ((8, 8), empty),
                     ((-4, 8), empty)]:
        with pytest.raises(ValueError, match=rf"^query_range \({bad[0]}, {bad[1]}\): {why}$"):
            bmojo_attention_chunked(*args, query_range=bad, **kwargs)
        if why == empty:  # the reference refuses the same ranges (it has no chunk grid)
            with pytest.raises(ValueError, match=rf"^query_range \({bad[0]}, {bad[1]}\): {why}$"):
                bmojo_attention_ref(*args, query_range=bad, **kwargs)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("window", [8, 64])  # 64 >= L: the whole-sequence fast path's case
def test_a_range_ending_inside_a_chunk_returns_exactly_its_queries(fused, window):
    length, chunk = 40, 8
    t = _inputs(1, length, 2, 2, 8)
    args = (t["q"], t["k"], t["v"], window, chunk)
    whole = bmojo_attention_ref(*args)
    for start, end in [(8, 20), (0, 35), (32, 37), (0, 40), (16, 99)]:
        part = bmojo_attention_chunked(*args, fused=fused, query_range=(start, end))
        assert part.shape[1] == min(end, length) - start
        torch.testing.assert_close(part, whole[:, start:end], rtol=1e-10, atol=1e-10)


# --- the model -------------------------------------------------------------------------------------------------------
def _op_ranges(monkeypatch, ssd_calls=None):
    """Record every attention op call's ``(query_range, length of its inputs)`` (``None``: every query) and, into
    ``ssd_calls``, every SSD op call's ``(length, whether it started from a given state)``."""
    import bmojo.layers.common as common

    calls = []
    real = common.dispatch

    def probe(op):
        fn = real(op)
        if op == "attention":
            return lambda *a, **kw: calls.append((kw.get("query_range"), a[0].shape[1])) or fn(*a, **kw)
        if op == "ssd" and ssd_calls is not None:
            return lambda *a, **kw: ssd_calls.append((a[0].shape[1], kw.get("initial_state") is not None)) or fn(
                *a, **kw
            )
        return fn

    monkeypatch.setattr(common, "dispatch", probe)
    return calls


def _step(model, x, mask):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=x, attention_mask=mask, labels=x)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# A block's op call: (its queries counted from the first position of its inputs, the length of its inputs). The
# inputs reach back over whole blocks to cover the keys the block's queries see: 2W = 16 positions before it with
# fading keys (B'MOJO), W = 8 without (the attention layer). 46 tokens, chunks of 4.
BLOCK_CALLS = {
    18: (  # rounded down to 16 (4 chunks): one block of context either way
        [((0, 16), 16), ((16, 32), 32), ((16, 30), 30)],
        [((0, 16), 16), ((16, 32), 32), ((16, 30), 30)],
        [(16, False), (16, True), (14, True)],
    ),
    10: (  # rounded down to 8: two blocks of context with fading keys, one without
        [((0, 8), 8), ((8, 16), 16), ((16, 24), 24), ((16, 24), 24), ((16, 24), 24), ((16, 22), 22)],
        [((0, 8), 8), ((8, 16), 16), ((8, 16), 16), ((8, 16), 16), ((8, 16), 16), ((8, 14), 14)],
        [(8, False)] + [(8, True)] * 4 + [(6, True)],
    ),
}


@pytest.mark.parametrize("block", sorted(BLOCK_CALLS))
@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("overrides", [
    dict(layers_block_type=["bmojo", "attention", "ssm", "bmojo"], num_hidden_layers=4),
    dict(memory_reset_at_document=True, memory_per_kv_head=True, key_set_bias=False, eos_token_id=5,
         selection_score="random"),
], ids=["every layer type", "documents, per head, random"])
def test_the_model_in_blocks_computes_the_same_losses_and_gradients_and_runs_the_op_per_block(block, recompute,
                                                                                              overrides, monkeypatch):
    ssd_calls = []
    calls = _op_ranges(monkeypatch, ssd_calls)
    x = tokens(2, 46)
    x[0, 11] = x[1, 20] = 5
    mask = torch.ones_like(x)
    mask[1, :5] = 0
    whole_model = tiny_model(sequence_block_size=None, **overrides).train()
    loss, grads = _step(whole_model, x, mask)
    types = whole_model.config.layers_block_type
    ssm_layers = sum(t in ("bmojo", "ssm") for t in types)
    assert calls == [(None, 46)] * sum(t in ("bmojo", "attention") for t in types)
    assert ssd_calls == [(46, False)] * ssm_layers
    blocked = tiny_model(sequence_block_size=block, **overrides).train()
    if recompute:
        blocked.selective_recompute_enable()
    calls.clear()
    ssd_calls.clear()
    out = blocked(input_ids=x, attention_mask=mask, labels=x)
    with_fading, without, scans = BLOCK_CALLS[block]
    ranges = [c for t in types if t != "ssm" for c in (with_fading if t == "bmojo" else without)]
    assert calls == ranges  # the forward: once per block, on the inputs its keys reach
    assert ssd_calls == scans * ssm_layers  # each block after the first starts from the state before it
    calls.clear()
    ssd_calls.clear()
    out.loss.backward()
    assert sorted(calls) == sorted(ranges if recompute else [])  # recomputed: each block once
    assert sorted(ssd_calls) == sorted(scans * ssm_layers if recompute else [])
    blocked_loss, blocked_grads = _step(blocked, x, mask)
    torch.testing.assert_close(blocked_loss, loss, rtol=1e-12, atol=1e-12)
    assert blocked_grads.keys() == grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(blocked_grads[name], g, rtol=1e-12, atol=1e-12, msg=name)


def _backward_bytes(length: int, recompute: bool) -> int:
    """Bytes allocated in one training step's backward of the tiny model (float32) in blocks of 32 tokens."""
    model = tiny_model(sequence_block_size=32, dtype=torch.float32).train()
    if recompute:
        model.selective_recompute_enable()
    x = tokens(1, length)
    loss = model(input_ids=x, labels=x).loss
    with torch.profiler.profile(profile_memory=True) as prof:
        loss.backward()
    return sum(max(e.self_cpu_memory_usage, 0) for e in prof.events())


@pytest.mark.parametrize("recompute", [False, True])
def test_the_backward_in_blocks_allocates_in_proportion_to_the_sequence(recompute):
    """Both ops' blocks take their inputs as pieces of one split (``torch.split``, ``key_context_blocks``), so the
    backward adds each block's gradient into its own pieces. Slicing the whole inputs per block instead made every
    block's backward add a zero-filled full-length gradient per input (O(L^2 / block); measured for the attention
    blocks: 5.96x the bytes for 4x the tokens, 5.34x recomputed; 4.00x either way in pieces)."""
    small, large = _backward_bytes(256, recompute), _backward_bytes(1024, recompute)
    assert large / small < 4.4


def test_no_blocks_where_the_sequence_fits_one_or_the_window_covers_it(monkeypatch):
    ssd_calls = []
    calls = _op_ranges(monkeypatch, ssd_calls)
    x = tokens(1, 32)
    for overrides, scans in ((dict(sequence_block_size=32), [(32, False)]),
                             (dict(sequence_block_size=None), [(32, False)]),
                             (dict(sequence_block_size=8, window_size=32), [(8, False)] + [(8, True)] * 3)):
        calls.clear()
        ssd_calls.clear()
        tiny_model(**overrides)(input_ids=x)
        assert calls == [(None, 32)] * 2, overrides  # a window covering the sequence: the attention op whole
        assert ssd_calls == scans * 2, overrides


class _Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids).logits


def test_a_traced_graph_runs_the_ops_whole(monkeypatch):
    """Blocks are for eager execution: ``torch.jit.trace`` (the CPU stand-in of ``torch_neuronx.trace``, which
    exports the trn1 prefill graph) records each op once over the whole sequence, with the blocked model's logits."""
    import warnings

    ssd_calls = []
    calls = _op_ranges(monkeypatch, ssd_calls)
    model = tiny_model(sequence_block_size=8, dtype=torch.float32)
    x = tokens(2, 32)
    with torch.no_grad():
        eager = model(input_ids=x).logits
        assert calls == [((0, 8), 8), ((8, 16), 16), ((16, 24), 24), ((16, 24), 24)] * 2  # eager: in blocks
        calls.clear()
        ssd_calls.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings
            traced = torch.jit.trace(_Logits(model), (x,), check_trace=False)
        assert calls == [(None, 32)] * 2 and ssd_calls == [(32, False)] * 2
        torch.testing.assert_close(traced(x), eager, rtol=1e-5, atol=1e-5)


def test_blocks_round_down_to_each_ops_own_chunk(monkeypatch):
    """The SSD's chunk may differ from the attention's (``ssd_chunk_size``): each op's blocks are whole chunks of
    its own."""
    ssd_calls = []
    calls = _op_ranges(monkeypatch, ssd_calls)
    tiny_model(sequence_block_size=14, ssd_chunk_size=8, layers_block_type=["bmojo"], num_hidden_layers=1)(
        input_ids=tokens(1, 30)
    )
    assert calls == [((0, 12), 12), ((12, 24), 24), ((24, 30), 30)]  # chunks of 4: 14 -> 12 (2W = 16 of context)
    assert ssd_calls == [(8, False), (8, True), (8, True), (6, True)]  # chunks of 8: 14 -> 8


def test_decoding_and_the_prefill_state_are_the_same_in_blocks():
    """A prefill that collects the decoding state runs in blocks too (the SSD state is the last block's): every
    tensor of the collected state is the whole prefill's, and the generated tokens are the same."""
    x = tokens(2, 40)
    mask = torch.ones_like(x)
    mask[1, :6] = 0  # a left-padded row
    outs, states = [], []
    for block in (None, 8):
        model = tiny_model(sequence_block_size=block)
        cache = model(input_ids=x, attention_mask=mask, use_cache=True).cache
        states.append([layer.tensors() for layer in cache.layers])
        outs.append(model.generate(x, attention_mask=mask, max_new_tokens=12, do_sample=False, min_new_tokens=12))
    assert torch.equal(outs[0], outs[1])
    for whole, blocked in zip(*states):
        assert whole.keys() == blocked.keys() and whole
        for name in whole:
            torch.testing.assert_close(blocked[name], whole[name], rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("bad", [0, -8, 2.5, True, "1024"])
def test_the_block_size_must_be_a_positive_integer_or_none(bad):
    from bmojo import preset_config

    with pytest.raises(ValueError, match=rf"^sequence_block_size must be a positive integer, got {bad!r}$"):
        preset_config("tiny", sequence_block_size=bad)


def test_blocks_run_the_dispatched_form_and_the_references_agree(monkeypatch):
    """Blocks go through ``dispatch`` like the whole op: on the reference backend every block runs the reference
    forms (the dense attention sliced, the sequential SSD from the given state), with the chunked forms' losses."""
    import bmojo.layers.common as common
    from bmojo.ops import use_backend

    forms = []
    real = common.dispatch
    def probe(op):  # every call of the dispatched form, by name
        fn = real(op)
        return lambda *a, **kw: forms.append((op, fn.__name__)) or fn(*a, **kw)

    monkeypatch.setattr(common, "dispatch", probe)
    x = tokens(1, 30)
    losses = {}
    for backend in ("chunked", "reference"):
        forms.clear()
        with use_backend(backend):
            losses[backend] = tiny_model(sequence_block_size=12)(input_ids=x, labels=x).loss
        blocks = [name for op, name in forms if op in ("attention", "ssd")]
        assert len(blocks) == 2 * 2 * 3  # 2 layers x 2 ops x 3 blocks
        assert all(("ref" in name) == (backend == "reference") for name in blocks), blocks
    torch.testing.assert_close(losses["reference"], losses["chunked"], rtol=1e-10, atol=1e-10)
