"""Hugging Face integration: save/load, generate(), batching with left padding, input errors."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from bmojo import BMojoForCausalLM
from support import tiny_model, tokens

# core: must also pass on the trn1 stack (torch 2.9 + transformers 4.57); the XLA tier runs it there too.
pytestmark = pytest.mark.core


@pytest.fixture(scope="module")
def model():
    return tiny_model(dtype=torch.float32)


def _tokens(length, seed):
    return tokens(1, length, seed=seed)


def test_save_and_load_give_identical_logits(model, tmp_path):
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is BMojoForCausalLM
    x = _tokens(41, 0)
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)


def _greedy_by_hand(model, prompt, steps):
    seq = prompt
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    return seq


def test_greedy_generate_equals_a_manual_loop(model):
    prompt = _tokens(29, 1)  # the prompt alone spans several chunks; generation crosses more boundaries
    out = model.generate(prompt, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(out, _greedy_by_hand(model, prompt, 24))


def test_left_padded_batch_equals_rows_one_by_one(model):
    prompts = [_tokens(n, 10 + n)[0] for n in (30, 17, 5)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = p
        mask[row, width - len(p) :] = 1
    batch = model.generate(
        ids, attention_mask=mask, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    for row, p in enumerate(prompts):
        alone = model.generate(p[None], max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert torch.equal(batch[row, width - len(p) :], alone[0])
    # and the parallel forward of a padded batch matches each row alone
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        for row, p in enumerate(prompts):
            torch.testing.assert_close(logits[row, width - len(p) :], model(p[None]).logits[0], rtol=1e-5, atol=1e-5)


def test_sampling_is_reproducible_and_uses_the_cache(model):
    prompt = _tokens(12, 3)
    kwargs = dict(max_new_tokens=16, do_sample=True, top_k=8, temperature=1.3, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(5)
    a = model.generate(prompt, **kwargs)
    torch.manual_seed(5)
    b = model.generate(prompt, **kwargs)
    assert torch.equal(a, b) and a.shape == (1, 28)
    assert torch.equal(a[:, :12], prompt)


@pytest.mark.parametrize(
    "ids,error,message",
    [
        (
            torch.tensor([[1, 2, 64]]),
            ValueError,
            r"token ids must lie in \[0, 64\) \(vocab_size\); got values in \[1, 64\]",
        ),
        (torch.tensor([[-1, 2]]), ValueError, r"token ids must lie in \[0, 64\)"),
        (torch.zeros(1, 0, dtype=torch.long), ValueError, r"input_ids is empty"),
        (torch.zeros(0, 5, dtype=torch.long), ValueError, r"input_ids is empty"),
        (
            torch.tensor([[1.0, 2.0]]),
            TypeError,
            r"input_ids must be an integer tensor \(torch.long\), got dtype torch.float32",
        ),
        (torch.tensor([1, 2, 3]), ValueError, r"input_ids must have shape \[batch, length\]"),
    ],
)
def test_bad_input_gives_a_clear_error(model, ids, error, message):
    with pytest.raises(error, match=message):
        model(ids)


def test_under_torch_compile_token_ids_are_checked_without_recompiling_as_their_range_changes(model):
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counter, dynamic=False)
    try:
        first = compiled(torch.tensor([[3, 4, 5, 6]])).logits
        frames = counter.frame_count
        with torch._dynamo.config.patch(error_on_recompile=True):  # a recompile of any piece, graph or not, raises
            again = compiled(torch.tensor([[1, 9, 63, 0]])).logits  # another smallest and largest id, same shape
        assert counter.frame_count == frames > 0  # the range check runs eagerly: no graph depends on the values
        assert torch.allclose(first, model(torch.tensor([[3, 4, 5, 6]])).logits, atol=1e-5)
        assert torch.allclose(again, model(torch.tensor([[1, 9, 63, 0]])).logits, atol=1e-5)
        message = r"token ids must lie in \[0, 64\) \(vocab_size\); got values in \[1, 64\]"
        with pytest.raises(ValueError, match=message):
            compiled(torch.tensor([[1, 2, 64, 5]]))
    finally:
        torch._dynamo.reset()


def test_bad_attention_masks_are_rejected(model):
    ids = torch.ones(2, 6, dtype=torch.long)
    with pytest.raises(ValueError, match="at least one real token"):
        model(ids, attention_mask=torch.tensor([[1] * 6, [0] * 6]))
    with pytest.raises(ValueError, match="one contiguous run of tokens per row"):
        model(ids, attention_mask=torch.tensor([[1] * 6, [1, 0, 1, 1, 1, 1]]))
    with pytest.raises(ValueError, match=r"attention_mask shape \(2, 5\) != input_ids shape \(2, 6\)"):
        model(ids, attention_mask=torch.ones(2, 5))


# --- generate() decodes from the fixed-size cache ------------------------------------------------------------------
# Recomputing the whole prefix at every step gives the same tokens, only slower, so output equality alone cannot
# tell a working cache from a lost one (transformers 5.2x renamed the cache keyword, and generate() silently fell
# back to the full prefix). These tests watch the mechanism: every call after the prompt feeds one token per row
# together with a BMojoCache.
@pytest.fixture(scope="module")
def model64():
    return tiny_model(dtype=torch.float64)


class _Calls:
    """Records, for every forward of the base model, the number of tokens per row and whether a cache came in."""

    def __init__(self, model):
        self.calls = []
        self.handle = model.model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        ids = args[0] if args else kwargs["input_ids"]
        self.calls.append((ids.shape[1], type(kwargs.get("cache")).__name__))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _left_padded(lengths, seed=20):
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = _tokens(n, seed + n)[0]
        mask[row, width - n :] = 1
    return ids, mask


GENERATE_MODES = {
    "greedy": dict(do_sample=False),
    "sampling": dict(do_sample=True, top_k=8, temperature=1.3),
    "beam_search": dict(do_sample=False, num_beams=3),
    "beam_sampling": dict(do_sample=True, num_beams=2, top_k=8),
}


@pytest.mark.parametrize("batched", [False, True], ids=["one_row", "left_padded_batch"])
@pytest.mark.parametrize("mode", list(GENERATE_MODES))
def test_generate_feeds_one_token_per_step_from_the_cache(model64, mode, batched):
    ids, mask = _left_padded([21, 9, 14]) if batched else (_tokens(21, 7), None)
    new = 12
    kwargs = dict(GENERATE_MODES[mode], max_new_tokens=new, min_new_tokens=new, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(3)
    with _Calls(model64) as watch:
        cached = model64.generate(ids, attention_mask=mask, **kwargs)
    # the prompt once, without a cache; then one token per row per step, always from a BMojoCache
    assert watch.calls[0] == (ids.shape[1], "NoneType")
    assert watch.calls[1:] == [(1, "BMojoCache")] * (new - 1)
    # and the cache changes nothing but the cost: the same call without it recomputes the prefix every step
    torch.manual_seed(3)
    with _Calls(model64) as slow:
        uncached = model64.generate(ids, attention_mask=mask, use_cache=False, **kwargs)
    assert [n for n, _ in slow.calls] == list(range(ids.shape[1], ids.shape[1] + new))
    assert torch.equal(cached, uncached)


def test_generate_with_a_user_cache_continues_from_it(model64):
    prompt = _tokens(30, 8)
    with torch.no_grad():
        out = model64(prompt[:, :-1], use_cache=True)
    kwargs = dict(max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    with _Calls(model64) as watch:
        continued = model64.generate(prompt, cache=out.cache, **kwargs)
    assert watch.calls == [(1, "BMojoCache")] * 6  # the cache already held the prompt but its last token
    assert torch.equal(continued, model64.generate(prompt, **kwargs))


@pytest.mark.parametrize("name", ["cache", "cache_params", "past_key_values"])
def test_prefill_then_decode_equals_the_parallel_forward(model64, name):
    x = _tokens(45, 9)  # crosses chunk boundaries and the 2W span during decoding
    split = 17
    with torch.no_grad():
        full = model64(x, output_hidden_states=True)
        prefill = model64(x[:, :split], use_cache=True)
        assert prefill.cache is not None and prefill.cache_params is prefill.cache
        cache = prefill.cache
        stepped = [model64(x[:, t : t + 1], output_hidden_states=True, **{name: cache}) for t in range(split, 45)]
    logits = torch.cat([prefill.logits] + [s.logits for s in stepped], dim=1)
    torch.testing.assert_close(logits, full.logits, rtol=1e-10, atol=1e-10)
    # output_hidden_states is honoured on the cached path, with the parallel forward's layout
    for layer, expect in enumerate(full.hidden_states):
        got = torch.cat([s.hidden_states[layer] for s in stepped], dim=1)
        torch.testing.assert_close(got, expect[:, split:], rtol=1e-10, atol=1e-10)
    assert int(cache.positions[0]) == 45


def test_output_flags_mean_the_same_on_both_paths(model64):
    x = _tokens(20, 4)
    with torch.no_grad():
        as_tuple = model64(x, use_cache=True, return_dict=False)
        as_dict = model64(x, use_cache=True)
        assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], as_dict.logits)
        step = model64(x[:, -1:], cache=as_dict.cache, return_dict=False)
        assert isinstance(step, tuple) and step[0].shape == (1, 1, 64)
        for cache in (None, as_dict.cache):
            with pytest.raises(ValueError, match="output_attentions is not supported"):
                model64(x[:, :1], cache=cache, output_attentions=True)
        with pytest.raises(ValueError, match="give the decoding cache once"):
            model64(x[:, :1], cache=as_dict.cache, cache_params=as_dict.cache)
        with pytest.raises(TypeError, match="the cache must be a BMojoCache"):
            model64(x[:, :1], cache=(torch.zeros(1),))
