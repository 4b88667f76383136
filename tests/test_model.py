"""Model-level specification: special cases as equalities, causality, decoding == parallel forward, memory."""

import pytest
import torch

from bmojo import BMojoCache
from bmojo.evals.peers import llama_config, llama_state_dict, mamba2_config, mamba2_state_dict
from bmojo.layers.bmojo import SWA_EQUIVALENT_KEY_SET_BIAS
from bmojo.ops import use_backend
from support import tiny_model, tokens

# core: must also pass on the trn1 stack (torch 2.9 + transformers 4.57); the XLA tier runs it there too.
pytestmark = pytest.mark.core


_model, _tokens = tiny_model, tokens


# --- special cases ----------------------------------------------------------------------------------------------
def _to_llama(model):
    from transformers import LlamaForCausalLM

    llama = LlamaForCausalLM(llama_config(model.config)).to(torch.float64)
    missing, unexpected = llama.load_state_dict(llama_state_dict(model.state_dict()), strict=False)
    assert not unexpected and all("rotary" in m or m == "lm_head.weight" for m in missing), (missing, unexpected)
    llama.tie_weights()
    return llama.eval()


def test_attention_with_window_covering_the_input_is_a_llama_transformer():
    model = _model(layers_block_type=["attention", "attention"], window_size=64, chunk_size=8)
    x = _tokens(2, 45)
    llama = _to_llama(model)
    with torch.no_grad():
        # Llama computes its rotary frequencies in float32: agreement is to float32 precision of the angles.
        torch.testing.assert_close(model(x).logits, llama(x).logits, rtol=1e-6, atol=1e-6)


def test_bmojo_without_fading_and_eidetic_memory_is_sliding_window_attention():
    # fading_self_key=False too: the self fading key (on by default) is the SSM's f_i, a fading memory
    bm = _model(layers_block_type=["bmojo", "bmojo"], use_fading=False, memory_size=0, fading_self_key=False)
    attn = _model(layers_block_type=["attention", "attention"])
    assert set(bm.state_dict()) == set(attn.state_dict())  # no SSM, no predictor left in the bmojo layers
    with_self_key = _model(layers_block_type=["bmojo", "bmojo"], use_fading=False, memory_size=0)
    assert with_self_key.model.layers[0].mixer.ssm is not None  # by default the layer keeps its SSM for f_i
    attn.load_state_dict(bm.state_dict())
    x = _tokens(2, 40)
    with torch.no_grad():
        torch.testing.assert_close(bm(x).logits, attn(x).logits, rtol=0, atol=0)


def test_fading_and_eidetic_memory_change_the_output():
    """The reduction above must not hold by accident: with the memories on, the same weights compute more."""
    full = _model()
    plain = _model(use_fading=False, memory_size=0, fading_self_key=False)
    plain.load_state_dict(full.state_dict(), strict=False)
    x = _tokens(1, 40)
    with torch.no_grad():
        assert (full(x).logits - plain(x).logits).abs().max() > 1e-3


def test_very_negative_key_set_bias_is_sliding_window_attention():
    """At ``SWA_EQUIVALENT_KEY_SET_BIAS`` a B'MOJO model (fading keys and eidetic memory on) computes, in float32,
    what the sliding-window attention model with the same q/k/v/o weights computes: the start ``bmojo convert``
    relies on. Parallel forward and decoding, on inputs long enough for both memories to be visible."""
    bm = _model(dtype=torch.float32, key_set_bias=True, key_set_bias_init=SWA_EQUIVALENT_KEY_SET_BIAS)
    with torch.no_grad():  # scores far larger than at init (std 0.02): here a bias of -20 would miss 1e-5, -30 not
        for layer in bm.model.layers:
            layer.mixer.q_proj.weight.mul_(15)
            layer.mixer.k_proj.weight.mul_(15)
    swa = _model(dtype=torch.float32, layers_block_type=["attention", "attention"])
    missing, unexpected = swa.load_state_dict(bm.state_dict(), strict=False)
    assert not missing and all(".ssm." in n or "bias" in n or "innovation" in n for n in unexpected), unexpected
    x = _tokens(2, 48)
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


def test_one_bmojo_layer_with_a_dominant_self_fading_key_is_its_mamba2_mixer():
    """Mamba-2 is a special case of one ``bmojo`` layer: with the self fading key, ``q_proj = 0`` (every logit is
    its bias), ``self_fading_bias = +1e4`` (every other weight is exp(-1e4) = 0 in float64) and ``v_proj = o_proj
    = I`` (``Hkv * D = d``), each bmojo layer outputs its fading token ``f_i``, which is what its ``ssm``
    (a ``Mamba2Mixer``) computes: the model equals the all-``ssm`` model holding those SSM weights, parallel
    forward and decoding, across chunk boundaries and memory eviction (fading keys and the memory stay on)."""
    options = dict(num_key_value_heads=4, fading_self_key=True, key_set_bias=True)
    bm = _model(**options)
    d = bm.config.hidden_size
    assert bm.config.num_key_value_heads * bm.config.head_dim == d == bm.config.num_attention_heads * bm.config.head_dim
    with torch.no_grad():
        for layer in bm.model.layers:
            layer.mixer.q_proj.weight.zero_()
            layer.mixer.v_proj.weight.copy_(torch.eye(d))
            layer.mixer.o_proj.weight.copy_(torch.eye(d))
            layer.mixer.self_fading_bias.fill_(1e4)
    mamba = _model(layers_block_type=["ssm", "ssm"], **options)
    ssm_weights = {n.replace(".mixer.ssm.", ".mixer."): w for n, w in bm.state_dict().items()
                   if ".mixer." not in n or ".mixer.ssm." in n}
    mamba.load_state_dict(ssm_weights)  # strict: exactly the SSM model's parameters
    cfg = bm.config
    length = 2 * cfg.window_size + 6 * cfg.chunk_size + 3
    x = _tokens(2, length)
    with torch.no_grad():
        expect = mamba(x).logits
        torch.testing.assert_close(bm(x).logits, expect, rtol=0, atol=0)
        caches = [BMojoCache.empty(m.config, 2, dtype=torch.float64) for m in (bm, mamba)]
        stepped = [torch.cat([m(x[:, t : t + 1], cache=c).logits for t in range(length)], 1)
                   for m, c in zip((bm, mamba), caches)]
        torch.testing.assert_close(stepped[0], stepped[1], rtol=0, atol=0)
        torch.testing.assert_close(stepped[0], expect, rtol=1e-12, atol=1e-12)
        # Not by accident: at self bias 0 the layer mixes in the window and the memories.
        for layer in bm.model.layers:
            layer.mixer.self_fading_bias.zero_()
        assert (bm(x).logits - expect).abs().max() > 1e-3


@pytest.mark.parametrize(
    "layers", [["ssm", "ssm"], ["bmojo", "bmojo"], ["attention", "ssm"], ["bmojo", "attention"]]
)
@pytest.mark.parametrize("use_mlp", [True, False])
def test_chunked_model_equals_reference_model(layers, use_mlp):
    """Whole model on the chunked ops == whole model on the references (sequential SSD loop, dense attention,
    plain-loop selection policy): outputs and parameter gradients."""
    model = _model(layers_block_type=layers, use_mlp=use_mlp)
    x = _tokens(2, 38)
    out = model(x, labels=x)
    grads = torch.autograd.grad(out.loss, list(model.parameters()), allow_unused=True)
    with use_backend("reference"):
        ref = model(x, labels=x)
        ref_grads = torch.autograd.grad(ref.loss, list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-10, atol=1e-10)
    for (name, _), a, b in zip(model.named_parameters(), grads, ref_grads):
        if a is None and b is None:
            continue
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10, msg=name)


def test_ssm_model_is_transformers_mamba2():
    """All-``ssm`` layers without MLP == transformers' own Mamba2ForCausalLM with the same weights."""
    from transformers import Mamba2ForCausalLM

    model = _model(layers_block_type=["ssm", "ssm"], use_mlp=False)
    mamba = Mamba2ForCausalLM(mamba2_config(model.config)).to(torch.float64)
    missing, unexpected = mamba.load_state_dict(mamba2_state_dict(model.state_dict()), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    mamba.tie_weights()
    x = _tokens(2, 21)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, mamba.eval()(x).logits.double(), rtol=1e-6, atol=1e-6)


# --- causality ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layers", [["bmojo", "bmojo"], ["ssm", "attention"]])
def test_changing_a_token_never_changes_earlier_logits(layers):
    model = _model(layers_block_type=layers)
    x = _tokens(1, 60)
    with torch.no_grad():
        base = model(x).logits
        for t in (0, 17, 33, 59):
            y = x.clone()
            y[0, t] = (y[0, t] + 7) % 61 + 3
            moved = model(y).logits
            torch.testing.assert_close(moved[:, :t], base[:, :t], rtol=0, atol=0)
            assert (moved[:, t:] - base[:, t:]).abs().max() > 0


# --- decoding -----------------------------------------------------------------------------------------------------
def _memory_positions(cache):
    out = []
    for layer in cache.layers:
        eidetic = getattr(layer, "eidetic", None)
        if eidetic is not None:
            mem = sorted(p for p, s in zip(eidetic.mem_pos[0].tolist(), eidetic.mem_score[0].tolist()) if s >= 0)
            run = sorted(p for p, s in zip(eidetic.run_pos[0].tolist(), eidetic.run_score[0].tolist()) if s >= 0)
            out.append((mem, run))
    return out


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_token_by_token_decoding_equals_parallel_forward(dtype, tol):
    model = _model(dtype=dtype)
    cfg = model.config
    length = 2 * cfg.window_size + 6 * cfg.chunk_size + 3  # >= 4 chunks beyond 2W: memory evicts entries
    x = _tokens(2, length)
    with torch.no_grad():
        parallel = model(x, use_cache=True)
        cache = BMojoCache.empty(cfg, 2, dtype=dtype)
        stepped, selections = [], []
        for t in range(length):
            stepped.append(model(x[:, t : t + 1], cache=cache).logits)
            prefix = model(x[:1, : t + 1], use_cache=True).cache
            selections.append((_memory_positions(prefix), _memory_positions(cache)))
    torch.testing.assert_close(torch.cat(stepped, 1), parallel.logits, rtol=tol, atol=tol)
    # The same tokens are selected and remembered at every position, by the parallel form and by decoding.
    for t, (from_parallel, from_decoding) in enumerate(selections):
        assert from_parallel == from_decoding, f"position {t}"
    # ...and the memory did evict: some token that was remembered earlier is gone at the end.
    remembered = {p for sel, _ in selections for mem, _ in sel for p in mem}
    final_memory = {p for mem, _ in _memory_positions(cache) for p in mem}
    assert remembered - final_memory
    assert all(len(mem) == cfg.memory_size for mem, _ in _memory_positions(cache))


def test_prefill_then_decode_equals_parallel_forward():
    model = _model()
    x = _tokens(2, 50)
    with torch.no_grad():
        full = model(x).logits
        for split in (1, 4, 13, 32):
            out = model(x[:, :split], use_cache=True)
            rest = model(x[:, split:], cache=out.cache).logits
            torch.testing.assert_close(torch.cat([out.logits, rest], 1), full, rtol=1e-12, atol=1e-12)


def test_decode_state_size_does_not_grow():
    model = _model(dtype=torch.float32)
    sizes, shapes = [], []
    with torch.no_grad():
        for length in (1000, 10000):
            cache = model(_tokens(1, length), use_cache=True).cache
            assert int(cache.positions[0]) == length
            for _ in range(3):
                model(_tokens(1, 1, seed=length), cache=cache)
            sizes.append(cache.nbytes())
            shapes.append([{k: tuple(v.shape) for k, v in layer.tensors().items()} for layer in cache.layers])
    assert sizes[0] == sizes[1] > 0
    assert shapes[0] == shapes[1]


def test_planted_innovation_reaches_a_token_far_beyond_window_and_fading_span(monkeypatch):
    """Plant a high innovation score on one early token; a query far past W + fading span then attends it
    (through the eidetic memory only), and without the plant it does not."""
    model = _model(layers_block_type=["bmojo"], num_hidden_layers=1, memory_size=2, selections_per_chunk=1)
    cfg = model.config
    far, length = 5, 90
    query = length - 1
    assert query - far > 2 * cfg.window_size + cfg.memory_size * cfg.chunk_size
    attn = model.model.layers[0].mixer
    original = type(attn)._innovation

    def planted(self, f_prev, k):
        score = original(self, f_prev, k) * 1e-3
        if score.dim() == 2:  # parallel form [B, L]: make position `far` the most surprising token by far
            score = score.clone()
            score[:, far] = 100.0
        return score

    x = _tokens(1, length)

    def output_at_query(value_bump):
        """Logits at `query` when the in-context value of token `far` is shifted by `value_bump`. Fading values
        come from the SSM's tokens, so only an eidetic slot can carry this shift across the distance."""
        calls = []

        def bump_first_call(module, inputs, output):
            calls.append(1)
            if len(calls) > 1:  # the second v_proj call maps fading tokens: leave it alone
                return output
            output = output.clone()
            output[:, far] += value_bump
            return output

        handle = attn.v_proj.register_forward_hook(bump_first_call)
        try:
            with torch.no_grad():
                return model(x).logits[0, query]
        finally:
            handle.remove()

    monkeypatch.setattr(type(attn), "_innovation", planted)
    changed_with_plant = (output_at_query(1.0) - output_at_query(0.0)).abs().max()
    cache = model(x, use_cache=True).cache
    assert far in cache.layers[0].eidetic.mem_pos[0].tolist()
    monkeypatch.setattr(type(attn), "_innovation", original)
    changed_without = (output_at_query(1.0) - output_at_query(0.0)).abs().max()
    assert changed_with_plant > 1e-4
    assert changed_without == 0
