"""Issue 11, the scoring side of the eidetic memory: what ranks tokens (``selection_score``), scores in float32 and
non-finite safety, ``learned_selection`` and ``memory_per_kv_head``. Each option: decoding == parallel forward
(float64, across chunk boundaries and eviction), chunked == reference, and a test of its mechanism."""

import pytest
import torch

from bmojo import BMojoCache
from bmojo.configuration_bmojo import V0_OPTIONS
from bmojo.layers.eidetic import random_bits, random_score
from bmojo.ops import use_backend
from bmojo.ops.selection import INVALID_SCORE, Slots, merge_slots, select_per_chunk, select_per_chunk_ref
from support import tiny_model, tokens

# core: must also pass on the trn1 stack (torch 2.9 + transformers 4.57); the XLA tier runs it there too.
pytestmark = pytest.mark.core

KINDS = ["key_prediction", "next_input", "random", "recency"]


def _memories(cache, row=0):
    """Per eidetic layer: (memory positions, current chunk's pick positions) of ``row``, sorted; per head with
    ``memory_per_kv_head`` (a tuple per head)."""
    out = []
    for layer in cache.layers:
        eidetic = getattr(layer, "eidetic", None)
        if eidetic is None:
            continue

        def valid(pos, score):
            return tuple(sorted(p for p, s in zip(pos.tolist(), score.tolist()) if s >= 0))

        if eidetic.per_head:
            heads = range(eidetic.mem_pos.shape[1])
            mem = tuple(valid(eidetic.mem_pos[row, a], eidetic.mem_score[row, a]) for a in heads)
            run = tuple(valid(eidetic.run_pos[row, a], eidetic.run_score[row, a]) for a in heads)
        else:
            mem = valid(eidetic.mem_pos[row], eidetic.mem_score[row])
            run = valid(eidetic.run_pos[row], eidetic.run_score[row])
        out.append((mem, run))
    return out


def _decode_equals_parallel(model, length, tol=1e-12, every=5):
    """Token-by-token decoding == the parallel forward: logits, and the memory and picks at every ``every``-th
    position (from a parallel prefill of that prefix) and at the end."""
    cfg = model.config
    x = tokens(2, length)
    with torch.no_grad():
        parallel = model(x, use_cache=True)
        cache = BMojoCache.empty(cfg, 2, dtype=next(model.parameters()).dtype)
        stepped = []
        for t in range(length):
            stepped.append(model(x[:, t : t + 1], cache=cache).logits)
            if t % every == every - 1:
                prefix = model(x[:, : t + 1], use_cache=True).cache
                for row in range(2):
                    assert _memories(prefix, row) == _memories(cache, row), f"position {t} row {row}"
    torch.testing.assert_close(torch.cat(stepped, 1), parallel.logits, rtol=tol, atol=tol)
    for row in range(2):
        assert _memories(parallel.cache, row) == _memories(cache, row)
    return cache


def _long(cfg):
    return 2 * cfg.window_size + 6 * cfg.chunk_size + 3  # several chunks past 2W: the memory evicts entries


# --- selection_score ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_decoding_equals_parallel_forward_for_every_score(kind):
    model = tiny_model(selection_score=kind)
    cache = _decode_equals_parallel(model, _long(model.config))
    assert all(len(mem) == model.config.memory_size for mem, _ in _memories(cache))


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_model_equals_reference_model_for_every_score(kind):
    """Outputs, innovation loss and parameter gradients on the chunked ops == on the references."""
    model = tiny_model(selection_score=kind)
    x = tokens(2, 38)
    mask = torch.ones_like(x)
    mask[1, :5] = 0  # a padded row: padding never scores
    out = model(x, attention_mask=mask, labels=x)
    params = [p for p in model.parameters()]
    grads = torch.autograd.grad(out.loss, params, allow_unused=True)
    with use_backend("reference"):
        ref = model(x, attention_mask=mask, labels=x)
        ref_grads = torch.autograd.grad(ref.loss, params, allow_unused=True)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-10, atol=1e-10)
    for (name, _), a, b in zip(model.named_parameters(), grads, ref_grads):
        if a is None and b is None:
            continue
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10, msg=name)


def test_innovation_loss_and_predictors_only_where_the_score_has_one():
    d, kv = 32, 2 * 8  # tiny: hidden 32, 2 key/value heads of 8
    counts = {}
    for kind in KINDS:
        model = tiny_model(selection_score=kind)
        names = {n.split(".mixer.")[-1].split(".")[0] for n, _ in model.named_parameters() if ".mixer." in n}
        counts[kind] = sum(p.numel() for p in model.parameters())
        out = model(tokens(1, 20), labels=tokens(1, 20))
        assert ("innovation_predictor" in names) == (kind == "key_prediction")
        assert ("input_predictor" in names) == (kind == "next_input")
        assert (out.innovation_loss is not None) == (kind in ("key_prediction", "next_input"))
        if out.innovation_loss is not None:
            assert out.innovation_loss > 0
            weight = model.config.innovation_loss_weight
            torch.testing.assert_close(out.loss, out.lm_loss + weight * out.innovation_loss)
        else:
            assert torch.equal(out.loss, out.lm_loss)
    layers = 2
    assert counts["key_prediction"] - counts["random"] == layers * (d * kv + kv)  # the documented difference
    assert counts["random"] == counts["recency"]
    assert counts["next_input"] - counts["random"] == layers * (d * d + d)


def test_next_input_score_is_the_error_of_predicting_the_layer_input():
    """The memory holds the reference policy's picks under scores recomputed by hand: the mean squared error of
    ``input_predictor(f_{t-1})`` against the layer input ``h_t`` (hooks catch ``h`` and the fading tokens ``f``)."""
    # v0 (chunk admission): the reference policy below admits picks when their chunk ends
    v0 = dict(V0_OPTIONS, selection_score="next_input")
    model = tiny_model(**v0, layers_block_type=["bmojo"], num_hidden_layers=1)
    cfg = model.config
    mixer = model.model.layers[0].mixer
    seen = {}
    h_hook = mixer.register_forward_pre_hook(lambda mod, args: seen.__setitem__("h", args[0]))
    f_hook = mixer.ssm.register_forward_hook(lambda mod, args, out: seen.__setitem__("f", out[0]))
    x = tokens(2, 37)
    with torch.no_grad():
        cache = model(x, use_cache=True).cache
    h_hook.remove()
    f_hook.remove()
    h, f = seen["h"], seen["f"]
    f_prev = torch.nn.functional.pad(f, [0, 0, 1, 0])[:, :-1]
    err = (mixer.input_predictor(f_prev) - h).pow(2).mean(-1).float()
    picks, seen_mem = select_per_chunk_ref(err, h, h, cfg.chunk_size, cfg.selections_per_chunk, cfg.memory_size)
    last = (x.shape[1] - 1) // cfg.chunk_size
    for row in range(2):
        want = sorted(p for p, s in zip(seen_mem.pos[row, last].tolist(), seen_mem.score[row, last].tolist()) if s >= 0)
        assert list(_memories(cache, row)[0][0]) == want


def test_recency_memory_holds_exactly_the_newest_picks():
    model = tiny_model(**dict(V0_OPTIONS, selection_score="recency"))  # v0: picks join when their chunk ends
    cfg = model.config
    C, k, M = cfg.chunk_size, cfg.selections_per_chunk, cfg.memory_size
    for length in (23, 40, 41):
        with torch.no_grad():
            cache = model(tokens(2, length), use_cache=True).cache
        done = (length - 1) // C  # finished chunks
        picks = [c * C + C - 1 - r for c in range(done) for r in range(k)]  # the newest k of every finished chunk
        current = list(range(done * C, length))[-k:]
        for row in range(2):
            for mem, run in _memories(cache, row):
                assert list(mem) == sorted(picks)[-M:]
                assert list(run) == current


def test_random_scores_are_reproducible_roughly_uniform_and_hash_layer_position_and_token():
    g = torch.Generator().manual_seed(0)
    positions = torch.arange(1 << 16)
    ids = torch.randint(0, 50_000, positions.shape, generator=g)
    a, b = random_score(0, positions, ids), random_score(0, positions, ids.clone())
    assert torch.equal(a, b) and a.dtype == torch.float32  # reproducible: a function of its integer inputs only
    assert 0 <= a.min() and a.max() < 1
    assert (a != random_score(1, positions, ids)).float().mean() > 0.99  # layers draw different scores
    assert (a != random_score(0, positions, ids + 1)).float().mean() > 0.99  # other tokens, same positions
    assert (a != random_score(0, positions + 1, ids)).float().mean() > 0.99  # same tokens, other positions
    counts = torch.histc(a, bins=16, min=0, max=1)
    expected = len(positions) / 16
    assert ((counts - expected).abs() / expected).max() < 0.06, counts  # ~4 standard deviations
    assert abs(a.mean() - 0.5) < 0.005
    # neighbouring positions are not correlated, nor are neighbouring token ids at one position
    assert abs(torch.corrcoef(torch.stack([a[:-1], a[1:]]))[0, 1]) < 0.02
    one_position = random_score(0, torch.zeros_like(positions), positions)  # every token id at position 0
    assert ((torch.histc(one_position, bins=16, min=0, max=1) - expected).abs() / expected).max() < 0.06
    assert abs(torch.corrcoef(torch.stack([one_position[:-1], one_position[1:]]))[0, 1]) < 0.02
    # broadcasting as in the parallel forward ([1, L] positions, [B, L] ids) == row by row as in decoding
    rows = ids[:96].view(3, 32)
    together = random_score(2, torch.arange(32)[None], rows)
    for r in range(3):
        for t in range(32):
            assert together[r, t] == random_score(2, torch.tensor([t]), rows[r, t : t + 1])[0]
    # int32 arithmetic (an accelerator's ``long``) gives the int64 bits
    for layer in (0, 1, 47):
        assert torch.equal(random_bits(layer, positions.int(), ids.int()).long(), random_bits(layer, positions, ids))
    with pytest.raises(ValueError, match=r'^selection_score="random" needs the token ids'):
        random_score(0, positions, None)


def _layer0_picks(model, x, monkeypatch, **kwargs):
    """Positions ``[B, nC, k]`` that layer 0's selection picked in the parallel forward of ``x``."""
    import bmojo.layers.bmojo as layer_module

    recorded = []
    original = layer_module.select

    def recording(*args, **kw):
        picks, seen = original(*args, **kw)
        recorded.append(picks)
        return picks, seen

    monkeypatch.setattr(layer_module, "select", recording)
    with torch.no_grad():
        model(x, **kwargs)
    monkeypatch.setattr(layer_module, "select", original)
    picks = recorded[0]
    return torch.where(picks.score >= 0, picks.pos, -1)


def test_random_selection_differs_between_examples_on_mqar(monkeypatch):
    """Zoology MQAR keeps its key-value pairs at positions ``0..2N-1`` in every example: a score of (layer,
    position) alone picked the same positions there in every example (e.g. two keys in chunk 0 of layer 0). The
    random score draws per example: the modal set of picks over the context is shared by few examples, and two
    examples pick differently in most chunks; the same tokens give the same picks."""
    from bmojo.evals.mqar import multiquery_ar

    model = tiny_model(selection_score="random", layers_block_type=["bmojo"], num_hidden_layers=1)
    cfg = model.config
    pairs, length, rows = 8, 32, 64
    x = torch.as_tensor(multiquery_ar(cfg.vocab_size, rows, length, seed=3, num_kv_pairs=pairs).inputs)
    picks = _layer0_picks(model, x, monkeypatch)
    context = picks[:, : 2 * pairs // cfg.chunk_size]  # the chunks holding the key-value pairs
    sets = [tuple(sorted(r.flatten().tolist())) for r in context]
    modal = max(sets.count(one) for one in set(sets))
    assert modal / rows <= 0.1, modal  # a positional policy: rows / rows
    # per chunk, two examples choose the same 2 of 4 positions about 1/6 of the time
    chunks = [sorted(c.tolist()) for r in picks for c in r]
    per_row = len(chunks) // rows
    pairs_of_rows = [(i * per_row + c, (i + 1) * per_row + c) for i in range(rows - 1) for c in range(per_row)]
    same = sum(chunks[a] == chunks[b] for a, b in pairs_of_rows)
    assert same / ((rows - 1) * per_row) < 0.35, same
    # reproducible: every row the same example -> every row the same picks, in a second call too
    repeated = x[:1].expand(8, -1)
    again = _layer0_picks(model, repeated, monkeypatch)
    assert (again == again[:1]).all() and torch.equal(again, _layer0_picks(model, repeated, monkeypatch))
    assert torch.equal(again[0], picks[0])


def test_only_random_scores_receive_the_token_ids_and_a_padded_row_scores_as_unpadded(monkeypatch):
    """The model hands the (rolled) token ids to the layers only for ``"random"``; a left-padded row's tokens keep
    their own ids and positions, so its scores, picks, memory and logits are those of the same row unpadded."""
    seen = []

    def catch(module, args):
        seen.append(args[1].token_ids)

    for kind in ("key_prediction", "recency"):
        model = tiny_model(selection_score=kind)
        handle = model.model.layers[0].register_forward_pre_hook(catch)
        with torch.no_grad():
            model(tokens(2, 9))
        handle.remove()
        assert seen.pop() is None
    model = tiny_model(selection_score="random")
    handle = model.model.layers[0].register_forward_pre_hook(catch)
    x, pad = tokens(2, 41), 6
    mask = torch.ones_like(x)
    mask[1, :pad] = 0
    with torch.no_grad():
        padded = model(x, attention_mask=mask, use_cache=True)
        alone = model(x[1:, pad:], use_cache=True)
    handle.remove()
    assert torch.equal(seen[0][0], x[0]) and torch.equal(seen[0][1, : 41 - pad], x[1, pad:])  # rolled ids
    assert _memories(padded.cache, 1) == _memories(alone.cache, 0)
    torch.testing.assert_close(padded.logits[1:, pad:], alone.logits, rtol=1e-12, atol=1e-12)
    picks = _layer0_picks(model, x, monkeypatch, attention_mask=mask)
    done = (41 - pad) // model.config.chunk_size  # the chunks of real tokens only
    assert torch.equal(picks[1, :done], _layer0_picks(model, x[1:, pad:], monkeypatch)[0, :done])
    # decoding on from the padded prefill keeps drawing from each row's own tokens and positions
    with torch.no_grad():
        rest = model(x[:, -5:], cache=padded.cache).logits
        want = model(torch.cat([x[1:, pad:], x[1:, -5:]], 1)).logits[:, -5:]
    torch.testing.assert_close(rest[1:], want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"^input_ids is required \(inputs_embeds is not supported\)$"):
        model(inputs_embeds=torch.zeros(1, 4, model.config.hidden_size, dtype=torch.float64))


# --- non-finite safety and float32 scores ---------------------------------------------------------------------------
def test_picks_and_merges_never_read_rows_they_do_not_move():
    """A non-finite key in a row that is not picked / not kept leaves the picks and the memory untouched (a one-hot
    matmul would give ``0 * inf = nan`` in every pick)."""
    scores = torch.rand(1, 16, generator=torch.Generator().manual_seed(0))
    k = torch.randn(1, 16, 3, dtype=torch.float64)
    loser = int(scores[0, :8].argmin())  # never among the top 2 of its chunk
    for bad in (float("inf"), float("nan")):
        dirty = k.clone()
        dirty[0, loser] = bad
        clean_picks, clean_seen = select_per_chunk(scores, k, k, 8, 2, 3)
        picks, seen = select_per_chunk(scores, dirty, dirty, 8, 2, 3)
        for a, b in zip((*picks, *seen), (*clean_picks, *clean_seen)):
            if a is not None:
                assert torch.equal(a, b)
        # merge: an entry that is dropped cannot reach the kept slots
        a_slots = Slots(dirty[:, :2], dirty[:, :2], torch.tensor([[0, 1]]), torch.tensor([[0.5, 0.0]]))
        b_slots = Slots(k[:, 2:4], k[:, 2:4], torch.tensor([[2, 3]]), torch.tensor([[0.9, 0.7]]))
        merged = merge_slots(a_slots, b_slots, 2)
        assert merged.pos.tolist() == [[2, 3]] and torch.equal(merged.k, k[:, 2:4])


@pytest.mark.parametrize("chunk,k,capacity", [(4, 2, 3), (8, 3, 5)])
def test_selection_gradients_reach_the_selected_rows_as_in_the_reference(chunk, k, capacity):
    g = torch.Generator().manual_seed(chunk)
    scores = torch.rand(2, 30, generator=g)
    scores[1, -4:] = INVALID_SCORE  # padding
    x = torch.randn(2, 30, 5, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(2, 30, dtype=torch.float64, generator=g, requires_grad=True)
    out = select_per_chunk(scores, x, 2 * x, chunk, k, capacity, bias=bias)
    ref = select_per_chunk_ref(scores, x, 2 * x, chunk, k, capacity, bias=bias)
    for got, want in zip(out, ref):
        valid = want.score >= 0
        assert torch.equal(got.score, want.score) and torch.equal(got.pos[valid], want.pos[valid])
        for a, b in ((got.k, want.k), (got.v, want.v), (got.bias, want.bias)):
            assert torch.equal(a, b)
    cot = [torch.randn(t.shape, generator=g, dtype=t.dtype) for part in ref for t in (part.k, part.v, part.bias)]
    loss = lambda res: sum((t * c).sum() for t, c in zip((t for p in res for t in (p.k, p.v, p.bias)), cot))  # noqa: E731
    grads = torch.autograd.grad(loss(out), (x, bias))
    ref_grads = torch.autograd.grad(loss(ref), (x, bias))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert (grads[1] != 0).sum() > 0


def _corrupt_key(model, token, value, decoding):
    """A hook setting the in-context key (the first ``k_proj`` call of each forward or step: the second maps the
    fading tokens) of ``token`` to ``value``; in ``decoding`` it counts steps to know the position."""
    calls = {"n": 0}

    def hook(module, inputs, output):
        calls["n"] += 1
        if calls["n"] % 2 == 0:
            return output
        output = output.clone()
        if not decoding:
            output[:, token] = value
        elif (calls["n"] - 1) // 2 == token:
            output[:, 0] = value
        return output

    return model.model.layers[0].mixer.k_proj.register_forward_hook(hook)


@pytest.mark.parametrize("kind", ["key_prediction", "random"])
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_a_non_finite_key_of_an_unselected_token_does_not_spread(kind, bad, monkeypatch):
    """One layer; token ``t``'s key is made non-finite. With key prediction its score turns non-finite (so it is
    never selected); with random scores it stays finite and ``t`` is a token its chunk does not pick. Either way
    the memory of every chunk is the clean run's, and so are the outputs of every position that does not see ``t``
    in its window: in decoding, in the reference forms and in the chunked forward (whose masked scores are replaced,
    not added to: ``nan + -inf`` would be ``nan`` for every query of a chunk whose key window holds ``t``)."""
    import bmojo.layers.bmojo as layer_module

    model = tiny_model(selection_score=kind, layers_block_type=["bmojo"], num_hidden_layers=1)
    cfg = model.config
    C, W, length = cfg.chunk_size, cfg.window_size, 45
    x = tokens(1, length)
    recorded = []
    original = layer_module.select

    def recording(scores, *args, **kwargs):
        result = original(scores, *args, **kwargs)
        recorded.append((scores, result))
        return result

    monkeypatch.setattr(layer_module, "select", recording)
    with torch.no_grad():
        clean = model(x).logits
        clean_scores, (_, clean_seen) = recorded.pop()
        start = 2 * C  # a chunk well inside the sequence, so later chunks' memories hold its picks
        t = start + int(clean_scores[0, start : start + C].argmin())
        handle = _corrupt_key(model, t, bad, decoding=False)
        dirty = model(x).logits
        dirty_scores, (_, dirty_seen) = recorded.pop()
        with use_backend("reference"):
            dirty_ref = model(x).logits
            ref_seen = recorded.pop()[1][1]
        handle.remove()
        handle = _corrupt_key(model, t, bad, decoding=True)
        cache = BMojoCache.empty(cfg, 1, dtype=torch.float64)
        stepped = torch.cat([model(x[:, i : i + 1], cache=cache).logits for i in range(length)], 1)
        handle.remove()
    if kind == "key_prediction":
        assert dirty_scores[0, t] == INVALID_SCORE  # the non-finite score became "never select"
    else:
        assert torch.equal(dirty_scores, clean_scores)
    for a, b in zip(dirty_seen, clean_seen):
        if a is not None:
            assert torch.equal(a, b)
    assert torch.equal(ref_seen.pos[ref_seen.valid], clean_seen.pos[clean_seen.valid])
    assert t not in dirty_seen.pos[dirty_seen.valid].tolist()
    position = torch.arange(length)
    sees_t = (position >= t) & (position < t + W)
    for logits in (stepped, dirty_ref, dirty):
        other = ~sees_t
        assert torch.isfinite(logits[:, other]).all()
        torch.testing.assert_close(logits[:, other], clean[:, other], rtol=1e-12, atol=1e-12)
    assert not torch.isfinite(stepped[:, sees_t]).all()  # the corruption did happen
    state = cache.layers[0].eidetic
    assert t not in state.mem_pos[state.mem_score >= 0].tolist()
    assert all(torch.isfinite(v).all() for v in state.tensors().values())


def test_scores_of_a_bf16_model_are_computed_in_float32():
    """The predictors' errors use float32 weights and inputs (a bf16 model's matmul rounding would otherwise decide
    close rankings differently in decoding and in the parallel forward)."""
    from bmojo.layers.eidetic import PartialSum, innovation_error, next_input_error

    g = torch.Generator().manual_seed(0)
    predictor = torch.nn.Linear(32, 16).to(torch.bfloat16)
    f_prev = torch.randn(2, 9, 32, generator=g).to(torch.bfloat16)
    k = torch.randn(2, 9, 2, 8, generator=g).to(torch.bfloat16)
    h = torch.randn(2, 9, 32, generator=g).to(torch.bfloat16)
    w, b = predictor.weight.float(), predictor.bias.float()
    pred = f_prev.float() @ w.T + b
    want = (pred - k.float().flatten(-2)).pow(2).mean(-1)
    got, per_head = innovation_error(predictor, PartialSum(), f_prev, k, 16, per_head=True)
    assert got.dtype == per_head.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    torch.testing.assert_close(per_head.mean(-1), want, rtol=1e-6, atol=0)
    in_bf16 = (predictor(f_prev) - k.flatten(-2)).pow(2).mean(-1).float()
    assert not torch.equal(in_bf16, got)
    wide = torch.nn.Linear(32, 32).to(torch.bfloat16)
    want = (f_prev.float() @ wide.weight.float().T + wide.bias.float() - h.float()).pow(2).mean(-1)
    torch.testing.assert_close(next_input_error(wide, f_prev, h), want, rtol=1e-6, atol=0)
    model = tiny_model(dtype=torch.bfloat16)
    assert model(tokens(1, 20)).innovation_loss.dtype == torch.float32


# --- learned_selection ----------------------------------------------------------------------------------------------
def _learned(seed=0, **overrides):
    """A model with learned_selection whose selection_bias is not neutral (fresh ones are zero)."""
    model = tiny_model(learned_selection=True, **overrides)
    g = torch.Generator().manual_seed(seed + 7)
    for layer in model.model.layers:
        bias = layer.mixer.selection_bias
        assert not bias.weight.any() and not bias.bias.any()  # zero-initialised: starts neutral
        with torch.no_grad():
            bias.weight.copy_(torch.randn(bias.weight.shape, generator=g, dtype=torch.float64) * 3)
            bias.bias.fill_(0.5)
    return model


def _slot_biases(state, row=0):
    """``{position: bias}`` of the valid memory slots and of the valid picks of ``row``."""
    out = []
    for prefix in ("mem", "run"):
        pos, score, bias = (getattr(state, f"{prefix}_{n}")[row] for n in ("pos", "score", "bias"))
        out.append({p: b for p, s, b in zip(pos.tolist(), score.tolist(), bias.tolist()) if s >= 0})
    return out


def test_a_fresh_learned_selection_is_neutral():
    plain, learned = tiny_model(learned_selection=False), tiny_model(learned_selection=True)
    x = tokens(2, 41)
    state = {n: p for n, p in learned.state_dict().items() if "selection_bias" not in n}
    plain.load_state_dict(state)
    with torch.no_grad():
        a, b = plain(x, use_cache=True), learned(x, use_cache=True)
    assert torch.equal(a.logits, b.logits)  # a zero bias ranks by the score and adds nothing (u = 0)
    assert _memories(a.cache) == _memories(b.cache)


def test_learned_selection_ranks_by_score_times_exp_u_and_slots_carry_u():
    """Every kept slot's bias is its token's ``u = clamp(selection_bias(h), -10, 10)``, and the memory is the
    reference policy's under the scores ``err * exp(u)`` (hooks catch ``h`` and the fading tokens)."""
    model = _learned(layers_block_type=["bmojo"], num_hidden_layers=1)
    cfg = model.config
    mixer = model.model.layers[0].mixer
    with torch.no_grad():
        mixer.selection_bias.weight.mul_(10)  # some u beyond the clamp
    seen = {}
    hooks = [
        mixer.register_forward_pre_hook(lambda mod, args: seen.__setitem__("h", args[0])),
        mixer.ssm.register_forward_hook(lambda mod, args, out: seen.__setitem__("f", out[0])),
    ]
    x = tokens(2, 37)
    with torch.no_grad():
        cache = model(x, use_cache=True).cache
    for hook in hooks:
        hook.remove()
    u_raw = mixer.selection_bias(seen["h"])[..., 0]
    assert u_raw.abs().max() > 10
    u = u_raw.clamp(-10, 10)
    with torch.no_grad():
        f_prev = torch.nn.functional.pad(seen["f"], [0, 0, 1, 0])[:, :-1]
        k = mixer.k_proj(seen["h"]).unflatten(-1, (cfg.num_key_value_heads, cfg.head_dim))
        err = mixer._innovation(f_prev, k).float()
    _, ref = select_per_chunk_ref(err * torch.exp(u.float()), k.flatten(-2), k.flatten(-2), cfg.chunk_size,
                                  cfg.selections_per_chunk, cfg.memory_size, bias=u)  # fmt: skip
    last = (x.shape[1] - 1) // cfg.chunk_size
    for row in range(2):
        mem, _ = _slot_biases(cache.layers[0].eidetic, row)
        want = {p: b for p, s, b in zip(*(t[row, last].tolist() for t in (ref.pos, ref.score, ref.bias))) if s >= 0}
        assert mem.keys() == want.keys() and len(mem) == cfg.memory_size
        for p in mem:
            assert mem[p] == pytest.approx(want[p], abs=1e-12) and mem[p] == pytest.approx(u[row, p].item(), abs=1e-12)


def test_learned_selection_decoding_equals_parallel_forward_and_carries_the_bias():
    model = _learned()
    cache = _decode_equals_parallel(model, _long(model.config))
    x = tokens(2, _long(model.config))
    with torch.no_grad():
        parallel = model(x, use_cache=True).cache
    for a, b in zip(parallel.layers, cache.layers):
        assert a.eidetic.mem_bias.dtype == torch.float64
        for row in range(2):
            for got, want in zip(_slot_biases(b.eidetic, row), _slot_biases(a.eidetic, row)):
                assert got.keys() == want.keys()
                for p in got:
                    assert got[p] == pytest.approx(want[p], abs=1e-12)


def test_learned_selection_chunked_equals_reference_and_trains_selection_bias_through_the_memory(monkeypatch):
    """Outputs and gradients on the chunked ops == on the references; the memory's bias is not detached, so a loss
    on it reaches ``selection_bias`` (the attention adds it to the eidetic logits: see the TODO test below)."""
    import bmojo.layers.bmojo as layer_module

    model = _learned()
    x = tokens(2, 38)
    out = model(x, labels=x)
    params = list(model.parameters())
    grads = torch.autograd.grad(out.loss, params, allow_unused=True)
    with use_backend("reference"):
        ref = model(x, labels=x)
        ref_grads = torch.autograd.grad(ref.loss, params, allow_unused=True)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-10, atol=1e-10)
    for (name, _), a, b in zip(model.named_parameters(), grads, ref_grads):
        if a is not None or b is not None:
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10, msg=name)
    memories = []
    original = layer_module.select

    def recording(*args, **kwargs):
        picks, seen = original(*args, **kwargs)
        memories.append(seen)
        return picks, seen

    monkeypatch.setattr(layer_module, "select", recording)
    model(x)
    weight = model.model.layers[0].mixer.selection_bias.weight
    (grad,) = torch.autograd.grad(sum(m.bias.sum() for m in memories), [weight])
    assert grad.abs().max() > 0


def test_lm_loss_trains_selection_bias_through_the_eidetic_logits():
    """The slots carry ``u`` (not detached) into the eidetic logits, so the LM loss trains ``selection_bias``."""
    model = _learned()
    x = tokens(2, 41)
    bias = model.model.layers[0].mixer.selection_bias
    grad_w, grad_b = torch.autograd.grad(model(x, labels=x).lm_loss, [bias.weight, bias.bias])
    assert grad_w.abs().max() > 0
    # A constant shift of u multiplies every score by the same factor: the same tokens are picked and kept, only
    # the slots' logits move. So the loss's derivative along the shift is exactly the gradient of bias.bias.
    eps, losses = 1e-6, []
    with torch.no_grad():
        for shift in (eps, -2 * eps):
            bias.bias.add_(shift)
            losses.append(model(x, labels=x).lm_loss)
        bias.bias.add_(eps)
    torch.testing.assert_close(grad_b[0], (losses[0] - losses[1]) / (2 * eps), rtol=1e-5, atol=1e-9)
    # No slot is visible before a token has left the window: then u gets no gradient at all.
    short = x[:, : model.config.window_size]
    grad_short = torch.autograd.grad(model(short, labels=short).lm_loss, [bias.weight])[0]
    assert not grad_short.any()


def test_tensor_parallel_rules_for_the_scoring_options():
    from bmojo import preset_config
    from bmojo.parallel import check_tp_size, parameter_rules

    rules = parameter_rules(preset_config("tiny", selection_score="next_input"))
    assert not any("predictor" in name for name in rules)  # input_predictor is replicated, like h and f
    assert "model.layers.0.mixer.innovation_predictor.weight" in parameter_rules(preset_config("tiny"))
    check_tp_size(preset_config("tiny", learned_selection=True), 1)
    check_tp_size(preset_config("tiny", learned_selection=True, ssm_ngroups=2), 2)  # test_tensor_parallel.py


# --- memory_per_kv_head ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_per_head_memory_decoding_equals_parallel_forward(kind):
    model = tiny_model(selection_score=kind, memory_per_kv_head=True, key_set_bias=False,
                       learned_selection=kind == "next_input")
    if kind == "next_input":  # also carry a non-neutral learned bias per head
        with torch.no_grad():
            for layer in model.model.layers:
                layer.mixer.selection_bias.weight.normal_(0, 3, generator=torch.Generator().manual_seed(3))
    cache = _decode_equals_parallel(model, _long(model.config))
    state = cache.layers[0].eidetic
    cfg = model.config
    assert state.mem_k.shape == (2, cfg.num_key_value_heads, cfg.memory_size, cfg.head_dim)
    assert state.mem_pos.shape == (2, cfg.num_key_value_heads, cfg.memory_size)


@pytest.mark.parametrize("kind", ["next_input", "random", "recency"])
def test_per_head_memories_with_a_shared_score_compute_the_shared_memory(kind):
    """Scores that are the same for every head make every head keep the same tokens: the head-folded attention
    then computes exactly what the shared memory computes (an equality test of the folding)."""
    shared = tiny_model(selection_score=kind, key_set_bias=False)  # per-head memories refuse key_set_bias
    per_head = tiny_model(selection_score=kind, memory_per_kv_head=True, key_set_bias=False)
    per_head.load_state_dict(shared.state_dict())
    x = tokens(2, 41)
    mask = torch.ones_like(x)
    mask[1, :6] = 0
    with torch.no_grad():
        a, b = shared(x, attention_mask=mask), per_head(x, attention_mask=mask)
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-12, atol=1e-12)


def test_per_head_memory_with_one_key_value_head_is_the_shared_memory():
    shared = tiny_model(num_key_value_heads=1, key_set_bias=False)  # per-head memories refuse key_set_bias
    per_head = tiny_model(num_key_value_heads=1, memory_per_kv_head=True, key_set_bias=False)
    per_head.load_state_dict(shared.state_dict())
    x = tokens(2, 41)
    with torch.no_grad():
        a, b = shared(x, use_cache=True), per_head(x, use_cache=True)
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-12, atol=1e-12)
    assert [mem[0] for mem, _ in _memories(b.cache)] == [mem for mem, _ in _memories(a.cache)]


def test_each_head_keeps_the_top_tokens_of_its_own_key_prediction_error():
    """Per-head key prediction: head ``a``'s memory is the reference policy under the error of its own ``D`` key
    features; the heads keep different tokens."""
    # v0 (chunk admission): the reference policy below admits picks when their chunk ends
    model = tiny_model(**dict(V0_OPTIONS, memory_per_kv_head=True), layers_block_type=["bmojo"], num_hidden_layers=1)
    cfg = model.config
    mixer = model.model.layers[0].mixer
    seen = {}
    hooks = [
        mixer.register_forward_pre_hook(lambda mod, args: seen.__setitem__("h", args[0])),
        mixer.ssm.register_forward_hook(lambda mod, args, out: seen.__setitem__("f", out[0])),
    ]
    x = tokens(2, 45)
    with torch.no_grad():
        cache = model(x, use_cache=True).cache
    for hook in hooks:
        hook.remove()
    with torch.no_grad():
        f_prev = torch.nn.functional.pad(seen["f"], [0, 0, 1, 0])[:, :-1]
        k = mixer.k_proj(seen["h"]).unflatten(-1, (cfg.num_key_value_heads, cfg.head_dim))
        pred = mixer.innovation_predictor(f_prev).unflatten(-1, (cfg.num_key_value_heads, cfg.head_dim))
        err = (pred - k).pow(2).mean(-1).float()  # [B, L, Hkv]
    last = (x.shape[1] - 1) // cfg.chunk_size
    for row in range(2):
        mems = _memories(cache, row)[0][0]
        for head in range(cfg.num_key_value_heads):
            _, ref = select_per_chunk_ref(err[:, :, head], k[:, :, head], k[:, :, head], cfg.chunk_size,
                                          cfg.selections_per_chunk, cfg.memory_size)  # fmt: skip
            want = sorted(p for p, s in zip(ref.pos[row, last].tolist(), ref.score[row, last].tolist()) if s >= 0)
            assert list(mems[head]) == want
        assert len(set(mems)) > 1  # the heads do not all keep the same tokens


def test_per_head_memory_chunked_equals_reference():
    model = tiny_model(memory_per_kv_head=True, key_set_bias=False)
    x = tokens(2, 38)
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    out = model(x, attention_mask=mask, labels=x)
    params = list(model.parameters())
    grads = torch.autograd.grad(out.loss, params, allow_unused=True)
    with use_backend("reference"):
        ref = model(x, attention_mask=mask, labels=x)
        ref_grads = torch.autograd.grad(ref.loss, params, allow_unused=True)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.innovation_loss, ref.innovation_loss, rtol=1e-12, atol=0)
    for (name, _), a, b in zip(model.named_parameters(), grads, ref_grads):
        if a is not None or b is not None:
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10, msg=name)


@pytest.mark.parametrize("overrides", [dict(memory_per_kv_head=True, key_set_bias=False), dict(learned_selection=True)])
def test_padded_prefill_then_decoding_equals_the_parallel_forward(overrides):
    """A left-padded prefill's state (rows of different lengths) then decoding == each row's parallel forward."""
    model = _learned() if overrides.get("learned_selection") else tiny_model(**overrides)
    x = tokens(2, 44)
    mask = torch.ones_like(x)
    mask[1, :7] = 0
    with torch.no_grad():
        full = [model(x[0:1]).logits, model(x[1:2, 7:]).logits]
        for split in (9, 26):
            out = model(x[:, :split], attention_mask=mask[:, :split], use_cache=True)
            rest = model(x[:, split:], cache=out.cache).logits
            logits = torch.cat([out.logits, rest], 1)
            torch.testing.assert_close(logits[0:1], full[0], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(logits[1:2, 7:], full[1], rtol=1e-12, atol=1e-12)


# --- bf16: decoding vs the parallel forward -------------------------------------------------------------------------
def _slot_agreement(model, x, checkpoints):
    """(memory slots the decoding state and a parallel prefill of the same prefix both hold, slots the prefill
    holds), summed over rows, layers and ``checkpoints`` (prefix lengths)."""

    def held(cache):
        return [
            {p for p, s in zip(e.mem_pos[row].tolist(), e.mem_score[row].tolist()) if s >= 0}
            for e in (layer.eidetic for layer in cache.layers)
            for row in range(x.shape[0])
        ]

    same = total = 0
    cache = BMojoCache.empty(model.config, x.shape[0], dtype=torch.bfloat16)
    for t in range(x.shape[1]):
        model(x[:, t : t + 1], cache=cache)
        if t + 1 in checkpoints:
            parallel = held(model(x[:, : t + 1], use_cache=True).cache)
            same += sum(len(a & b) for a, b in zip(parallel, held(cache)))
            total += sum(len(a) for a in parallel)
    return same, total


def test_bf16_decoding_keeps_the_parallel_forwards_memory_at_the_measured_rate():
    """bf16 (scores in float32): the fraction of memory slots that token-by-token decoding and the parallel forward
    agree on, 8 rows x 256 tokens of the tiny preset with ``memory_size=8`` (eviction throughout), compared after
    64, 128, 192 and 256 tokens. Measured (x86 CPU, torch 2.13): 507/512 = 0.990 for this seed; over seeds 0-9,
    5100/5120 = 0.9961 (with the key predictor run in bf16, as before issue 11: 5099/5120 = 0.9959: the remaining
    disagreement comes from bf16 keys and fading tokens, not from the error's arithmetic). Asserted: >= 0.98, a
    margin of ~5 slots for other BLAS builds. Commands: ``OMP_NUM_THREADS=1 python -m pytest -q -s
    tests/test_selection_options.py -k bf16_decoding`` (prints this seed's rate); ``OMP_NUM_THREADS=1 python
    scripts/measure_bf16_memory_agreement.py --seeds 10`` (the 10 seeds; the "before" number is the same
    measurement on commit aa7ebb0)."""
    model = tiny_model(seed=0, dtype=torch.bfloat16, memory_size=8)
    x = tokens(8, 256, seed=100)
    with torch.no_grad():
        same, total = _slot_agreement(model, x, (64, 128, 192, 256))
    print(f"bf16 decode-vs-parallel memory agreement: {same}/{total} = {same / total:.4f}")
    assert total == 4 * 8 * 2 * 8  # checkpoints x rows x layers x full memories
    assert same / total >= 0.98
