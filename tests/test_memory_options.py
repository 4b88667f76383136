"""The eidetic-memory options of issue 11 together (selection_score, learned_selection, memory_score_decay,
memory_admission, memory_reset_at_document, memory_per_kv_head, fading_self_key, key_set_bias,
eidetic_key_distance): on packed documents long enough for several chunks past ``2W`` and for eviction, decoding
token by token == the parallel forward == the reference ops, and generate() with the cache == without it."""

import pytest
import torch

from bmojo import BMojoCache
from bmojo.configuration_bmojo import V0_OPTIONS
from bmojo.ops import use_backend
from support import tiny_model, tokens

EOS = 2  # the tiny preset's eos_token_id; tokens() draws ids >= 3
LENGTH = 2 * 8 + 6 * 4 + 3  # tiny: W = 8, C = 4, M = 4: six chunks past 2W, the memory evicts

EVERYTHING = dict(
    selection_score="key_prediction", learned_selection=True, memory_score_decay=0.9,
    memory_admission="window_exit", memory_reset_at_document=True, fading_self_key=True, key_set_bias=True,
    eidetic_key_distance="zero",
)  # fmt: skip

# A sample of the grid (every value of every option appears, most pairs of options too). memory_per_kv_head is
# refused with key_set_bias (BMojoConfig), so its rows leave key_set_bias off.
COMBINATIONS = {
    "everything": EVERYTHING,
    "everything_next_input": {**EVERYTHING, "selection_score": "next_input"},
    "everything_random_window": {**EVERYTHING, "selection_score": "random", "eidetic_key_distance": "window"},
    "recency_exit_reset_self": dict(selection_score="recency", memory_admission="window_exit",
                                    memory_reset_at_document=True, fading_self_key=True, eidetic_key_distance="zero"),
    "key_learned_self_bias": dict(learned_selection=True, fading_self_key=True, key_set_bias=True),
    "next_input_decay_exit_bias": dict(selection_score="next_input", memory_score_decay=0.9,
                                       memory_admission="window_exit", key_set_bias=True, eidetic_key_distance="zero"),
    "random_learned_decay_reset": dict(selection_score="random", learned_selection=True, memory_score_decay=0.9,
                                       memory_reset_at_document=True),
    "recency_learned_decay": dict(selection_score="recency", learned_selection=True, memory_score_decay=0.9,
                                  eidetic_key_distance="zero"),
    "defaults": dict(eidetic_key_distance="zero", fading_self_key=True, key_set_bias=True, learned_selection=True,
                     memory_admission="window_exit"),
    "per_head_everything": {**EVERYTHING, "key_set_bias": False, "memory_per_kv_head": True},
    "per_head_recency_exit": dict(selection_score="recency", memory_admission="window_exit", memory_per_kv_head=True),
    "per_head_next_input_learned_reset_self": dict(selection_score="next_input", learned_selection=True,
                                                   memory_reset_at_document=True, fading_self_key=True,
                                                   memory_per_kv_head=True),
    "per_head_random_decay_reset": dict(selection_score="random", memory_score_decay=0.9,
                                        memory_reset_at_document=True, eidetic_key_distance="zero",
                                        memory_per_kv_head=True),
}  # fmt: skip


def _model(**options):
    """The tiny fp64 model with ``options``; a learned selection bias and key-set biases that are not neutral (and
    differ per head), so both reach the logits."""
    options = {**V0_OPTIONS, **options}  # the combinations are spelled on the original design (v0)
    model = tiny_model(**dict(options, key_set_bias_init=-1.0 if options["key_set_bias"] else 0.0))
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for layer in model.model.layers:
            mixer = layer.mixer
            if options.get("learned_selection"):
                mixer.selection_bias.weight.copy_(torch.randn(mixer.selection_bias.weight.shape, generator=g) * 3)
            for name in ("fading_bias", "self_fading_bias", "eidetic_bias"):
                if hasattr(mixer, name):
                    getattr(mixer, name).add_(torch.randn(getattr(mixer, name).shape, generator=g) * 0.5)
    return model


def _packed(bsz, length):
    ids = tokens(bsz, length)
    for b, i in [(0, 9), (0, 22), (0, 31), (1, 17), (1, 18), (1, 36)]:  # mid-chunk, at a chunk's end, consecutive
        if b < bsz and i < length:
            ids[b, i] = EOS
    return ids


def _slots(cache):
    """Per eidetic layer, row (and head): ``{slot set: {position: bias}}`` of the valid entries of the memory, the
    current chunk's picks and the admission queue (bias 0.0 without learned_selection)."""
    out = []
    for layer in cache.layers:
        state = layer.eidetic
        sets = {}
        for prefix in ("mem", "run", "wait"):
            pos, score, bias = (getattr(state, f"{prefix}_{n}") for n in ("pos", "score", "bias"))
            if pos is None:
                continue
            bias = torch.zeros_like(score, dtype=torch.float64) if bias is None else bias
            pos, score, bias = (t.flatten(0, -2) for t in (pos, score, bias))  # rows (x heads), slots
            sets[prefix] = [
                {p: b for p, s, b in zip(*(t[r].tolist() for t in (pos, score, bias))) if s >= 0}
                for r in range(pos.shape[0])
            ]
        out.append(sets)
    return out


def _assert_slots_equal(a, b):
    for layer_a, layer_b in zip(a, b, strict=True):
        assert layer_a.keys() == layer_b.keys()
        for name in layer_a:
            for row_a, row_b in zip(layer_a[name], layer_b[name], strict=True):
                assert sorted(row_a) == sorted(row_b), name  # the same tokens
                for p in row_a:  # carrying the same bias (u of the same token, to fp64 rounding)
                    assert abs(row_a[p] - row_b[p]) <= 1e-12


@pytest.mark.parametrize("options", list(COMBINATIONS.values()), ids=list(COMBINATIONS))
def test_decoding_equals_parallel_forward_and_reference_for_combined_options(options):
    model = _model(**options)
    x = _packed(2, LENGTH)
    with torch.no_grad():
        parallel = model(x, use_cache=True)
        cache = BMojoCache.empty(model.config, 2, dtype=torch.float64)
        stepped, remembered = [], set()
        for t in range(LENGTH):
            stepped.append(model(x[:, t : t + 1], cache=cache).logits)
            for layer, sets in enumerate(_slots(cache)):
                remembered |= {(layer, r, p) for r, mem in enumerate(sets["mem"]) for p in mem}
        torch.testing.assert_close(torch.cat(stepped, 1), parallel.logits, rtol=1e-12, atol=1e-12)
        _assert_slots_equal(_slots(parallel.cache), _slots(cache))
        final = {(layer, r, p) for layer, sets in enumerate(_slots(cache)) for r, mem in enumerate(sets["mem"])
                 for p in mem}  # fmt: skip
        assert remembered - final, "no token left the memory: the test does not reach eviction"
        # A prefill handing its state over mid-stream (mid-chunk, mid-queue), then decoding, agrees too.
        for split in (6, 19, 30):
            out = model(x[:, :split], use_cache=True)
            rest = model(x[:, split:], cache=out.cache).logits
            torch.testing.assert_close(torch.cat([out.logits, rest], 1), parallel.logits, rtol=1e-12, atol=1e-12)
    # The chunked ops == the reference ops: outputs and every parameter's gradient.
    params = list(model.parameters())
    out = model(x, labels=x)
    grads = torch.autograd.grad(out.loss, params, allow_unused=True)
    with use_backend("reference"):
        ref = model(x, labels=x)
        ref_grads = torch.autograd.grad(ref.loss, params, allow_unused=True)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-10, atol=1e-10)
    for a, b in zip(grads, ref_grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_generate_with_every_option_on_equals_generate_without_cache():
    model = _model(**EVERYTHING)
    prompts = _packed(2, 30)
    ids, mask = prompts.clone(), torch.ones_like(prompts)
    ids[1, :9], mask[1, :9] = 0, 0  # a left-padded row; both prompts hold end-of-document tokens
    kwargs = dict(max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    cached = model.generate(ids, attention_mask=mask, **kwargs)
    uncached = model.generate(ids, attention_mask=mask, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)
    alone = model.generate(prompts[1:, 9:], **kwargs)  # the padded row gives what it gives alone
    assert torch.equal(cached[1:, 9:], alone)
