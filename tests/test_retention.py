"""Retention options of the eidetic memory (issue 11): score decay, admission at window exit, reset at document
boundaries. Each: the chunked form == the plain-loop reference, decoding == the parallel forward (fp64, across
chunk boundaries and eviction), and a test of the mechanism itself."""

import pytest
import torch

from bmojo import BMojoCache
from bmojo.configuration_bmojo import V0_OPTIONS
from bmojo.ops import use_backend
from bmojo.ops.selection import (
    INVALID_SCORE,
    Slots,
    eidetic_mask_ref,
    memory_per_chunk,
    merge_slots,
    select_per_chunk,
    select_per_chunk_ref,
    take_selected,
    topk_per_chunk,
)
from support import tiny_model, tokens

EOS = 2  # the tiny preset's eos_token_id; support.tokens() draws ids >= 3


def _valid_equal(a: Slots, b: Slots):
    """The same valid slots, in the same order, with the same rows (invalid slots may hold anything)."""
    assert torch.equal(a.valid, b.valid)
    keep = a.valid
    assert torch.equal(a.pos[keep], b.pos[keep])
    assert torch.equal(a.score[keep], b.score[keep])
    for x, y in ((a.k, b.k), (a.v, b.v)):
        assert torch.equal(x[keep], y[keep])


def _scores(bsz, length, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(bsz, length, generator=g)
    scores[0, 5] = 0.0  # a zero score is a valid score
    scores[-1, -5:] = INVALID_SCORE  # padding
    return scores


def _chunked_equals_reference(length, chunk, k, capacity, window, **options):
    g = torch.Generator().manual_seed(length)
    scores = _scores(2, length, length + 1)
    kx = torch.randn(2, length, 6, generator=g, dtype=torch.float64, requires_grad=True)
    vx = torch.randn(2, length, 6, generator=g, dtype=torch.float64, requires_grad=True)
    picks, seen = select_per_chunk(scores, kx, vx, chunk, k, capacity, **options)
    picks_ref, seen_ref = select_per_chunk_ref(scores, kx, vx, chunk, k, capacity, **options)
    _valid_equal(picks, picks_ref)
    _valid_equal(seen, seen_ref)
    # Gradients reach the remembered tokens alike (through the valid slots).
    w = torch.randn(seen.k.shape, generator=g, dtype=torch.float64)
    grads = [
        torch.autograd.grad((torch.where(s.valid[..., None], s.k * w + s.v * w, 0)).sum(), (kx, vx))
        for s in (seen, seen_ref)
    ]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # And the visibility mask rebuilt from the chunked memory is the reference's.
    mask = torch.zeros(2, length, length, dtype=torch.bool)
    doc_start = options.get("doc_start")
    for b in range(2):
        for i in range(length):
            c = i // chunk
            for m in range(capacity):
                p = int(seen.pos[b, c, m])
                if seen.valid[b, c, m] and p <= i - window and (doc_start is None or p >= doc_start[b, i]):
                    mask[b, i, p] = True
    ref = eidetic_mask_ref(scores, chunk, k, capacity, window, **options)
    assert torch.equal(mask, ref)
    return seen


# --- decoding == parallel forward, for a model with the given options ------------------------------------------
def _memory_positions(cache):
    out = []
    for layer in cache.layers:
        eidetic = getattr(layer, "eidetic", None)
        if eidetic is not None:
            parts = [(eidetic.mem_pos, eidetic.mem_score), (eidetic.run_pos, eidetic.run_score)]
            if eidetic.wait_pos is not None:
                parts.append((eidetic.wait_pos, eidetic.wait_score))
            out.append([sorted(p for p, s in zip(pos[0].tolist(), sc[0].tolist()) if s >= 0) for pos, sc in parts])
    return out


def _decode_equals_parallel(x, **overrides):
    model = tiny_model(**overrides)
    cfg = model.config
    length = x.shape[1]
    with torch.no_grad():
        parallel = model(x, use_cache=True)
        cache = BMojoCache.empty(cfg, x.shape[0], dtype=torch.float64)
        stepped, selections = [], []
        for t in range(length):
            stepped.append(model(x[:, t : t + 1], cache=cache).logits)
            prefix = model(x[:1, : t + 1], use_cache=True).cache
            selections.append((_memory_positions(prefix), _memory_positions(cache)))
    torch.testing.assert_close(torch.cat(stepped, 1), parallel.logits, rtol=1e-12, atol=1e-12)
    for t, (from_parallel, from_decoding) in enumerate(selections):
        assert from_parallel == from_decoding, f"position {t}"
    # The memory did evict: some token remembered earlier is gone at the end.
    remembered = {p for sel, _ in selections for parts in sel for p in parts[0]}
    final = {p for parts in _memory_positions(cache) for p in parts[0]}
    assert remembered - final
    # Prefill then decode agrees too (the state handed over mid-stream, e.g. mid-queue).
    with torch.no_grad():
        for split in (5, 19, 30):
            out = model(x[:, :split], use_cache=True)
            rest = model(x[:, split:], cache=out.cache).logits
            torch.testing.assert_close(torch.cat([out.logits, rest], 1), parallel.logits, rtol=1e-12, atol=1e-12)
    return model, selections


def _stream_length(model_cfg=None):
    return 2 * 8 + 6 * 4 + 3  # tiny: W=8, C=4; >= 4 chunks beyond 2W, the memory (M=4) evicts


# --- memory_score_decay -------------------------------------------------------------------------------------------
def test_decay_one_is_todays_merge_and_decay_ages_old_slots():
    """A slot picked in chunk 0 (score 1.0) against a pick of chunk 10 (score 0.5): with decay d the old one holds
    1.0 * d^10, so it loses at d = 0.9 (0.35) and wins at d = 0.95 (0.60) and at d = 1."""
    old = Slots(torch.zeros(1, 1, 2), torch.zeros(1, 1, 2), torch.tensor([[1]]), torch.tensor([[1.0]]))
    new = Slots(torch.ones(1, 1, 2), torch.ones(1, 1, 2), torch.tensor([[41]]), torch.tensor([[0.5]]))
    for decay, winner in ((1.0, 1), (0.95, 1), (0.9, 41)):
        kept = merge_slots(old, new, 1, chunk_size=4, decay=decay)
        assert kept.pos.tolist() == [[winner]], decay
        assert kept.score.tolist() == [[1.0 if winner == 1 else 0.5]]  # slots keep the token's own score
    # decay = 1 is bit-identical to the merge without the option
    a = Slots(torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randint(0, 50, (2, 3)), torch.rand(2, 3))
    b = Slots(torch.randn(2, 2, 4), torch.randn(2, 2, 4), torch.randint(0, 50, (2, 2)), torch.rand(2, 2))
    for x, y in zip(merge_slots(a, b, 3), merge_slots(a, b, 3, chunk_size=4, decay=1.0)):
        assert x is None and y is None or torch.equal(x, y)


@pytest.mark.parametrize("decay", [0.9, 0.5])
@pytest.mark.parametrize("length,chunk,k,capacity,window", [(41, 4, 2, 3, 8), (33, 8, 1, 5, 8)])
def test_decay_chunked_equals_reference(decay, length, chunk, k, capacity, window):
    _chunked_equals_reference(length, chunk, k, capacity, window, decay=decay)


def _last_quarter_fraction(decay, length=4096, chunk=8, k=2, capacity=16):
    scores = torch.rand(1, length, generator=torch.Generator().manual_seed(0))  # stationary scores
    onehot, s, p = topk_per_chunk(scores, chunk, k)
    cand = Slots(take_selected(onehot, torch.zeros(1, length, 1)), take_selected(onehot, torch.zeros(1, length, 1)),
                 p, s)  # fmt: skip
    _, final = memory_per_chunk(cand, capacity, chunk_size=chunk, decay=decay)
    assert bool(final.valid.all())
    return (final.pos >= 3 * length // 4).float().mean().item()


def test_decay_keeps_mostly_recent_tokens_of_a_stationary_stream():
    """'Keep the M best ever' is a uniform sample of the past (about a quarter of the slots from the last quarter);
    with decay the memory holds mostly recent tokens."""
    assert _last_quarter_fraction(1.0) < 0.5
    assert _last_quarter_fraction(0.95) > 0.9


def test_decay_evicts_an_early_high_score_token():
    length, chunk, k, capacity = 400, 4, 2, 4
    scores = torch.rand(1, length, generator=torch.Generator().manual_seed(3))
    scores[0, 2] = 100.0  # a cold-start spike
    onehot, s, p = topk_per_chunk(scores, chunk, k)
    zeros = take_selected(onehot, torch.zeros(1, length, 1))
    for decay, stays in ((1.0, True), (0.9, False)):
        seen, _ = memory_per_chunk(Slots(zeros, zeros, p, s), capacity, chunk_size=chunk, decay=decay)
        held = [(seen.pos[0, c] == 2).any().item() for c in range(seen.pos.shape[1])]
        assert held[1]  # remembered at first
        assert held[-1] == stays  # with decay 100 * 0.9^n falls below the fresh picks: gone
        if not stays:
            gone = held.index(False, 1)
            assert not any(held[gone:])  # and never comes back


def test_decay_decode_equals_parallel():
    _decode_equals_parallel(tokens(2, _stream_length()), memory_score_decay=0.7)


def test_decay_model_chunked_equals_reference():
    model = tiny_model(memory_score_decay=0.7)
    x = tokens(2, 38)
    out = model(x, labels=x)
    grads = torch.autograd.grad(out.loss, list(model.parameters()), allow_unused=True)
    with use_backend("reference"):
        ref = model(x, labels=x)
        ref_grads = torch.autograd.grad(ref.loss, list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-10, atol=1e-10)
    for a, b in zip(grads, ref_grads):
        if a is not None or b is not None:
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


# --- memory_admission="window_exit" -------------------------------------------------------------------------------
@pytest.mark.parametrize("decay", [1.0, 0.8])
@pytest.mark.parametrize("length,chunk,k,capacity,window", [(41, 4, 2, 3, 8), (50, 4, 1, 5, 12)])
def test_window_exit_chunked_equals_reference(decay, length, chunk, k, capacity, window):
    delay = window // chunk
    _chunked_equals_reference(length, chunk, k, capacity, window, decay=decay, delay=delay)
    # Chunk c's picks are first in the memory seen by chunk c + 1 + W/C: that memory is "chunk" admission's at c + 1.
    scores, zeros = _scores(2, length, length + 1), torch.zeros(2, length, 1)
    _, late = select_per_chunk(scores, zeros, zeros, chunk, k, capacity, decay=decay, delay=delay)
    _, now = select_per_chunk(scores, zeros, zeros, chunk, k, capacity, decay=decay)
    assert not late.valid[:, :delay].any()
    _valid_equal(Slots(*(f[:, delay:] for f in late[:4])), Slots(*(f[:, :-delay] for f in now[:4])))


def test_window_exit_leaves_no_slot_invisible():
    """Every slot of the memory a chunk sees is visible to every query of that chunk (pos <= i - W); with "chunk"
    admission slots are held by tokens still inside the window."""
    length, chunk, k, capacity, window = 64, 4, 2, 6, 12
    scores = _scores(1, length, 7)
    zeros = torch.zeros(1, length, 1)
    invisible = {}
    for delay in (0, window // chunk):
        _, seen = select_per_chunk(scores, zeros, zeros, chunk, k, capacity, delay=delay)
        count = 0
        for c in range(seen.pos.shape[1]):
            for i in range(c * chunk, min((c + 1) * chunk, length)):
                count += int((seen.valid[0, c] & (seen.pos[0, c] > i - window)).sum())
        invisible[delay] = count
    assert invisible[0] > 0 and invisible[window // chunk] == 0


def test_window_exit_decode_equals_parallel():
    model, selections = _decode_equals_parallel(tokens(2, _stream_length()), memory_admission="window_exit")
    # the queue was in use: picks waited there before joining the memory
    assert any(parts[2] for sel, _ in selections for parts in sel)
    assert model.model.layers[0].mixer.retention["delay"] == 2


def test_window_exit_with_decay_decode_equals_parallel():
    _decode_equals_parallel(tokens(2, _stream_length()), memory_admission="window_exit", memory_score_decay=0.6)


# --- memory_reset_at_document -------------------------------------------------------------------------------------
def _starts_by_loop(ids, eos):
    out = torch.zeros_like(ids)
    for b in range(ids.shape[0]):
        start = 0
        for i in range(ids.shape[1]):
            out[b, i] = start
            if ids[b, i] == eos:
                start = i + 1
    return out


@pytest.mark.parametrize("length", [1, 2, 7, 16, 50, 130])
def test_document_starts(length):
    from bmojo.modeling_bmojo import document_starts

    g = torch.Generator().manual_seed(length)
    ids = torch.randint(0, 6, (3, length), generator=g)  # token 2 is the end of a document, often
    ids[1, 0] = 2  # a document of one token
    ids[2] = 3  # no end at all: one document
    if length > 3:
        ids[0, -2:] = 2  # consecutive ends
    assert torch.equal(document_starts(ids, 2), _starts_by_loop(ids, 2))


def _doc_starts(bsz, length, ends):
    ids = tokens(bsz, length)
    for b, i in ends:
        ids[b, i] = EOS
    return ids, _starts_by_loop(ids, EOS)


@pytest.mark.parametrize("decay,delay", [(1.0, 0), (0.8, 0), (1.0, 2), (0.7, 3)])
def test_reset_chunked_equals_reference(decay, delay):
    length, chunk, k, capacity, window = 60, 4, 2, 3, 8
    _, doc_start = _doc_starts(2, length, [(0, 21), (0, 22), (0, 39), (1, 12), (1, 47)])
    seen = _chunked_equals_reference(length, chunk, k, capacity, window, decay=decay, delay=delay,
                                     doc_start=doc_start)  # fmt: skip
    # Slots of finished documents are gone at the next merge: chunk c's memory is all from c's first document.
    starts = doc_start[:, ::chunk]
    assert bool((seen.pos >= starts[..., None])[seen.valid].all())
    assert seen.valid[:, -1].any()  # (and the memory refills within a document)


def _attention_inputs(length, window, chunk):
    g = torch.Generator().manual_seed(5)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()

    t = {n: r(2, length, 4 if n.startswith("q") else 2, 8) for n in ("q", "k", "v", "k_fade", "v_fade", "q_eid")}
    scores = torch.rand(2, length, generator=g)
    # Memory without document reset: slots of earlier documents stay, only the attention's mask can hide them.
    picks, seen = select_per_chunk(scores, t["k"].flatten(-2), t["v"].flatten(-2), chunk, 2, 5)
    memory = seen._replace(k=seen.k.unflatten(-1, (2, 8)), v=seen.v.unflatten(-1, (2, 8)))
    return t, memory


def test_reset_mask_in_every_attention_form():
    """Reference, chunked (the fused form and separate sets) and the decoding step agree with ``doc_start``; a change
    to the values of a slot from an earlier document never reaches a query (with the mask), but does without."""
    from bmojo.ops.attention import bmojo_attention_chunked, bmojo_attention_ref, bmojo_attention_step

    length, window, chunk = 45, 8, 4
    t, memory = _attention_inputs(length, window, chunk)
    _, doc_start = _doc_starts(2, length, [(0, 25), (0, 34), (1, 30)])  # documents start mid-chunk (26, 35, 31)
    args = (t["q"], t["k"], t["v"], window, chunk, t["k_fade"], t["v_fade"], t["q_eid"])
    ref = bmojo_attention_ref(*args, memory, doc_start=doc_start)
    for fused in (True, False):
        out = bmojo_attention_chunked(*args, memory, fused=fused, doc_start=doc_start)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(ref)
    names = ["q", "k", "v", "q_eid"]
    g_ref = torch.autograd.grad((ref * grad).sum(), [t[n] for n in names], retain_graph=True)
    g_out = torch.autograd.grad((bmojo_attention_chunked(*args, memory, doc_start=doc_start) * grad).sum(),
                                [t[n] for n in names])  # fmt: skip
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    # The decoding step over a full-history "ring" (every position) gives the same outputs.
    with torch.no_grad():
        ring_pos = torch.arange(length).expand(2, -1)
        for i in range(length):
            c = i // chunk
            mem = memory._replace(**{f: getattr(memory, f)[:, c] for f in ("k", "v", "pos", "score")})
            past = ring_pos.masked_fill(ring_pos > i, -1)
            ring = (t["k"], t["v"], past, window, t["k_fade"], t["v_fade"])
            out = bmojo_attention_step(t["q"][:, i], torch.full((2,), i), *ring, t["q_eid"][:, i], mem,
                                       doc_start=doc_start[:, i])  # fmt: skip
            torch.testing.assert_close(out, ref[:, i], rtol=1e-10, atol=1e-10, msg=f"position {i}")
    # The probe: shift the values of every slot from before each query's document.
    with torch.no_grad():
        earlier = memory.valid & (memory.pos < doc_start[:, ::chunk][..., None])  # [B, nC, M], per chunk start
        moved = memory._replace(v=memory.v + 10.0)  # every slot's value
        base = bmojo_attention_chunked(*args, memory, doc_start=doc_start)
        shifted = bmojo_attention_chunked(*args, moved, doc_start=doc_start)
        # a query changes iff it sees some slot of its own document
        pos = memory.pos[:, torch.arange(length) // chunk]  # [B, L, M]
        own = (memory.valid[:, torch.arange(length) // chunk] & (pos >= doc_start[..., None])
               & (pos <= torch.arange(length)[:, None] - window))  # fmt: skip
        changed = (shifted - base).abs().amax(dim=(2, 3)) > 0
        assert torch.equal(changed, own.any(-1))
        unmasked = (bmojo_attention_chunked(*args, moved) - bmojo_attention_chunked(*args, memory)).abs()
        sees_earlier = (pos < doc_start[..., None]) & (pos <= torch.arange(length)[:, None] - window)
        assert bool((unmasked.amax(dim=(2, 3)) > 0)[sees_earlier.any(-1) & ~own.any(-1)].all())
        assert earlier.any() and (sees_earlier.any(-1) & ~own.any(-1)).any()  # the probe had something to hide


def _packed(length):
    ids = tokens(2, length)
    for b, i in [(0, 9), (0, 22), (0, 31), (1, 17), (1, 18), (1, 36)]:  # mid-chunk, at a chunk's end, consecutive
        ids[b, i] = EOS
    return ids


# On the original design (v0) with the option(s) under test: the packed stream's short documents leave picks in the
# memory of row 0 (the eviction check below) only for the tokens the v0 model's weights pick.
def test_reset_decode_equals_parallel():
    _decode_equals_parallel(_packed(_stream_length()), **dict(V0_OPTIONS, memory_reset_at_document=True))


def test_reset_with_window_exit_and_decay_decode_equals_parallel():
    _decode_equals_parallel(_packed(_stream_length()), **dict(V0_OPTIONS, memory_reset_at_document=True,
                            memory_admission="window_exit", memory_score_decay=0.8))  # fmt: skip


def test_reset_model_chunked_equals_reference():
    model = tiny_model(memory_reset_at_document=True, memory_score_decay=0.8, memory_admission="window_exit")
    x = _packed(44)
    out = model(x, labels=x)
    grads = torch.autograd.grad(out.loss, list(model.parameters()), allow_unused=True)
    with use_backend("reference"):
        ref = model(x, labels=x)
        ref_grads = torch.autograd.grad(ref.loss, list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-10, atol=1e-10)
    for a, b in zip(grads, ref_grads):
        if a is not None or b is not None:
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_reset_off_or_without_end_tokens_changes_nothing():
    x = tokens(2, 43)  # no end-of-document token
    plain = tiny_model()
    reset = tiny_model(memory_reset_at_document=True)
    with torch.no_grad():
        assert torch.equal(plain(x).logits, reset(x).logits)
        packed = _packed(43)
        assert not torch.equal(plain(packed).logits, reset(packed).logits)  # (with end tokens it does act)


def test_reset_hides_an_earlier_document_from_a_query(monkeypatch):
    """A token planted in the memory of document 1 (far beyond the window and fading span) reaches queries of
    document 1 only through the eidetic memory; with the reset, no query of document 2 sees it, also those in the
    chunk where document 2 starts (before the next merge drops it)."""
    far, end, length = 5, 41, 90  # document 2 starts at 42, mid-chunk (chunk 10 = 40..43)
    x = tokens(1, length)
    x[0, end] = EOS

    def change_at_queries(reset):
        model = tiny_model(layers_block_type=["bmojo"], num_hidden_layers=1, memory_size=2, selections_per_chunk=1,
                           memory_reset_at_document=reset)  # fmt: skip
        attn = model.model.layers[0].mixer
        original = type(attn)._innovation

        def planted(self, f_prev, k):
            score = original(self, f_prev, k) * 1e-3
            score = score.clone()
            score[:, far] = 100.0
            return score

        monkeypatch.setattr(type(attn), "_innovation", planted)

        def logits(bump):
            calls = []

            def hook(module, inputs, output):
                calls.append(1)
                if len(calls) > 1:  # the second v_proj call maps fading tokens
                    return output
                output = output.clone()
                output[:, far] += bump
                return output

            handle = attn.v_proj.register_forward_hook(hook)
            try:
                with torch.no_grad():
                    return model(x).logits[0]
            finally:
                handle.remove()

        diff = (logits(1.0) - logits(0.0)).abs().amax(-1)
        monkeypatch.setattr(type(attn), "_innovation", original)
        return diff

    with_reset, without = change_at_queries(True), change_at_queries(False)
    doc1 = slice(2 * 8 + far, end + 1)  # beyond the fading span, still document 1
    assert bool((with_reset[doc1] > 1e-6).all()) and bool((without[doc1] > 1e-6).all())
    assert bool((with_reset[end + 1 :] == 0).all())  # document 2, including 42 and 43 in the boundary chunk
    assert bool((without[end + 1 :] > 1e-6).all())


# --- the closed form of memory_per_chunk (no per-chunk loop) -----------------------------------------------------
def _candidates(bsz, num_chunks, sel, seed, features=3):
    g = torch.Generator().manual_seed(seed)
    length = num_chunks * 4
    scores = torch.rand(bsz, length, generator=g)
    scores[:, 7] = 0.0
    scores[:, 8] = 0.0  # ties at zero: the earlier position wins
    scores[0, 13] = scores[0, 22] = 0.5  # a tie of real scores
    scores[-1, -6:] = INVALID_SCORE  # padding, and a chunk with fewer real tokens than picks
    onehot, s, p = topk_per_chunk(scores, 4, sel)
    x = torch.randn(bsz, length, 2 * features, generator=g, dtype=torch.float64)
    rows = take_selected(onehot, x)
    k = rows[..., :features].detach().requires_grad_()
    v = rows[..., features:].detach().requires_grad_()
    return Slots(k, v, p, s), scores


@pytest.mark.parametrize(
    "options",
    [{}, {"decay": 0.8}, {"delay": 2}, {"decay": 0.5, "delay": 3}, {"doc": True},
     {"doc": True, "decay": 0.9, "delay": 1}],  # fmt: skip
)
def test_closed_form_equals_scan(options):
    from bmojo.ops.selection.chunk import memory_per_chunk_closed, memory_per_chunk_scan

    options = dict(options)
    cand, scores = _candidates(2, 15, 2, 4)
    if options.pop("doc", False):
        ids = tokens(2, scores.shape[1])
        for b, i in [(0, 10), (0, 26), (1, 31), (1, 32)]:
            ids[b, i] = EOS
        options["chunk_doc_start"] = _starts_by_loop(ids, EOS)[:, ::4]
    results = [form(cand, 5, chunk_size=4, **options) for form in (memory_per_chunk_closed, memory_per_chunk_scan)]
    for a, b in zip(*results):  # seen and final
        _valid_equal(a, b)
    (seen, _), (seen_scan, _) = results
    assert seen.valid.any() and not seen.valid.all()  # empty slots, and eviction (15 chunks x 2 picks > 5 slots)
    w = torch.randn(seen.k.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads = [torch.autograd.grad((torch.where(s.valid[..., None], s.k * w + s.v * w**2, 0)).sum(), (cand.k, cand.v))
             for s in (seen, seen_scan)]  # fmt: skip
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-14)


def test_closed_form_keeps_non_finite_rows_out():
    """A pick that never enters the memory cannot poison it (the scan's one-hot matmul would: 0 * nan = nan)."""
    from bmojo.ops.selection.chunk import memory_per_chunk_closed, memory_per_chunk_scan

    cand, _ = _candidates(1, 6, 2, 9)
    early = cand.score[0, :3].flatten()  # picks of chunks 0-2, all real
    never = early.masked_fill(early < 0, 2.0).argmin()  # the lowest: never among the best 3
    k = cand.k.detach().clone()
    k.view(-1, k.shape[-1])[never] = float("nan")
    poisoned = cand._replace(k=k)
    seen, final = memory_per_chunk_closed(poisoned, 3)
    assert not (seen.pos == cand.pos.flatten()[never]).any()
    assert torch.isfinite(seen.k).all() and torch.isfinite(final.k).all()
    clean, _ = memory_per_chunk_scan(cand, 3)
    _valid_equal(seen, clean)


def test_memory_per_chunk_runs_the_closed_form_up_to_its_limit(monkeypatch):
    import bmojo.ops.selection.chunk as chunk_mod

    calls = []
    for name in ("memory_per_chunk_closed", "memory_per_chunk_scan"):
        real = getattr(chunk_mod, name)
        counted = lambda *a, _real=real, _name=name, **kw: calls.append(_name) or _real(*a, **kw)  # noqa: E731
        monkeypatch.setattr(chunk_mod, name, counted)
    cand, _ = _candidates(1, 8, 2, 0)
    chunk_mod.memory_per_chunk(cand, 4)
    monkeypatch.setattr(chunk_mod, "CLOSED_FORM_MAX_PICKS", 15)
    chunk_mod.memory_per_chunk(cand, 4)
    assert calls == ["memory_per_chunk_closed", "memory_per_chunk_scan"]


@pytest.mark.parametrize("overrides", [{}, {"memory_score_decay": 0.7, "memory_admission": "window_exit",
                                            "memory_reset_at_document": True}])  # fmt: skip
def test_model_with_closed_form_equals_model_with_scan(monkeypatch, overrides):
    import bmojo.ops.selection.chunk as chunk_mod

    model = tiny_model(**overrides)
    x = _packed(41)

    def run():
        out = model(x, labels=x)
        return out.logits, torch.autograd.grad(out.loss, list(model.parameters()), allow_unused=True)

    closed_logits, closed_grads = run()
    monkeypatch.setattr(chunk_mod, "CLOSED_FORM_MAX_PICKS", 0)
    scan_logits, scan_grads = run()
    assert torch.equal(closed_logits, scan_logits)  # the same memory: bit-identical outputs
    for a, b in zip(closed_grads, scan_grads):
        if a is not None or b is not None:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


# --- generate() with every retention option ------------------------------------------------------------------------
def test_generate_with_retention_options_left_padded_equals_rows_alone_and_manual_loop():
    model = tiny_model(memory_reset_at_document=True, memory_admission="window_exit", memory_score_decay=0.8)
    prompts = [_packed(40)[0, :n] for n in (40, 23, 6)]  # end-of-document tokens inside the prompts
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = p
        mask[row, width - len(p) :] = 1
    kwargs = dict(max_new_tokens=14, do_sample=False, eos_token_id=None, pad_token_id=0)
    batch = model.generate(ids, attention_mask=mask, **kwargs)
    for row, p in enumerate(prompts):
        alone = model.generate(p[None], **kwargs)
        assert torch.equal(batch[row, width - len(p) :], alone[0])
        with torch.no_grad():  # greedy decoding == argmax of the parallel forward, token by token
            logits = model(alone[:, :-1]).logits[0, len(p) - 1 :]
        assert torch.equal(logits.argmax(-1), alone[0, len(p) :])
