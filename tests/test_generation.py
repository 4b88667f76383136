"""Hugging Face integration: save/load, generate(), batching with left padding, input errors."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from bmojo import BMojoForCausalLM, preset_config


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return BMojoForCausalLM(preset_config("tiny")).eval()


def _tokens(length, seed):
    return torch.randint(3, 64, (1, length), generator=torch.Generator().manual_seed(seed))


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
        (torch.tensor([[1, 2, 64]]), ValueError, r"token ids must lie in \[0, 64\) \(vocab_size\); got values in \[1, 64\]"),
        (torch.tensor([[-1, 2]]), ValueError, r"token ids must lie in \[0, 64\)"),
        (torch.zeros(1, 0, dtype=torch.long), ValueError, r"input_ids is empty"),
        (torch.zeros(0, 5, dtype=torch.long), ValueError, r"input_ids is empty"),
        (torch.tensor([[1.0, 2.0]]), TypeError, r"input_ids must be an integer tensor \(torch.long\), got dtype torch.float32"),
        (torch.tensor([1, 2, 3]), ValueError, r"input_ids must have shape \[batch, length\]"),
    ],
)
def test_bad_input_gives_a_clear_error(model, ids, error, message):
    with pytest.raises(error, match=message):
        model(ids)


def test_bad_attention_masks_are_rejected(model):
    ids = torch.ones(2, 6, dtype=torch.long)
    with pytest.raises(ValueError, match="at least one real token"):
        model(ids, attention_mask=torch.tensor([[1] * 6, [0] * 6]))
    with pytest.raises(ValueError, match="one contiguous run of tokens per row"):
        model(ids, attention_mask=torch.tensor([[1] * 6, [1, 0, 1, 1, 1, 1]]))
    with pytest.raises(ValueError, match=r"attention_mask shape \(2, 5\) != input_ids shape \(2, 6\)"):
        model(ids, attention_mask=torch.ones(2, 5))
