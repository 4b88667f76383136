"""Issue 11, the scoring side of the eidetic memory: what ranks tokens (``selection_score``), scores in float32 and
non-finite safety, ``learned_selection`` and ``memory_per_kv_head``. Each option: decoding == parallel forward
(float64, across chunk boundaries and eviction), chunked == reference, and a test of its mechanism."""

import pytest
import torch

from bmojo import BMojoCache
from bmojo.layers.eidetic import random_score
from bmojo.ops import use_backend
from bmojo.ops.selection import select_per_chunk_ref
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
    model = tiny_model(selection_score="next_input", layers_block_type=["bmojo"], num_hidden_layers=1)
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
    model = tiny_model(selection_score="recency")
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


def test_random_scores_are_reproducible_roughly_uniform_and_ignore_the_input():
    positions = torch.arange(1 << 16)
    a, b = random_score(0, positions), random_score(0, positions)
    assert torch.equal(a, b) and a.dtype == torch.float32
    assert 0 <= a.min() and a.max() < 1
    assert (a != random_score(1, positions)).float().mean() > 0.99  # layers draw different scores
    counts = torch.histc(a, bins=16, min=0, max=1)
    expected = len(positions) / 16
    assert ((counts - expected).abs() / expected).max() < 0.06, counts  # ~4 standard deviations
    assert abs(a.mean() - 0.5) < 0.005
    # neighbouring positions are not correlated
    assert abs(torch.corrcoef(torch.stack([a[:-1], a[1:]]))[0, 1]) < 0.02
    # The selection depends only on positions: two different inputs keep the same tokens.
    model = tiny_model(selection_score="random")
    with torch.no_grad():
        one = model(tokens(1, 41, seed=1), use_cache=True).cache
        two = model(tokens(1, 41, seed=2), use_cache=True).cache
    assert _memories(one) == _memories(two)
    assert _memories(one)[0] != _memories(one)[1]  # but every layer has its own draw
