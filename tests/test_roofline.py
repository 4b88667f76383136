"""The paper counts of ``bmojo.roofline`` against the code they describe: torch's FLOP counter on the CPU, on tiny
configs, for the whole training step and for each sequence op alone, forward and backward separately."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from bmojo import BMojoForCausalLM, preset_config
from bmojo.configuration_bmojo import V0_OPTIONS, BMojoConfig
from bmojo.layers.eidetic import selection_bias_logit
from bmojo.ops.attention.chunk import bmojo_attention_chunked
from bmojo.ops.selection.chunk import select_per_chunk
from bmojo.ops.selection.common import EideticMemory
from bmojo.ops.ssd.chunk import ssd_chunked
from bmojo.roofline import (
    ISSUE_11_FIELDS,
    TRN1,
    attention_op,
    main,
    op_times,
    options_config,
    parameter_count,
    report,
    selection_op,
    ssd_op,
    step_ops,
)

aten = torch.ops.aten


def _conv_backward(grad_out, x, w, _bias, _stride, _padding, _dilation, transposed, _out_pad, _groups, output_mask,
                   out_shape=None, **kwargs):
    # torch's own formula prices the input gradient of a grouped conv as a dense one (groups ignored); the
    # depthwise conv's input and weight gradients each cost what its forward does.
    return conv_flop_count(x, w, grad_out, transposed) * (int(output_mask[0]) + int(output_mask[1]))


MAPPING = {aten.convolution_backward: _conv_backward}


def counted(forward, backward=None) -> tuple[int, int]:
    """FLOPs torch counts in ``forward()`` and in ``backward(out)``, SDPA in its math form (the one the model's
    joint attention takes on the CPU: its query/key width differs from the value width; torch's counter has no
    formula for the CPU's flash kernel, which the other calls would take)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False, custom_mapping=MAPPING) as counter:
        out = forward()
        fwd = counter.get_total_flops()
        if backward is not None:
            backward(out)
    return fwd, counter.get_total_flops() - fwd


def _sum_loss(out):
    (out[0] if isinstance(out, tuple) else out).square().sum().backward()


def _mixed(**options):
    # every layer type, the SSD chunk apart from the attention chunk, a length that fills no chunk, no MLP
    return BMojoConfig(vocab_size=50, hidden_size=32, num_hidden_layers=3,
                       layers_block_type=["bmojo", "attention", "ssm"], num_attention_heads=4, num_key_value_heads=2,
                       window_size=8, chunk_size=4, ssd_chunk_size=8, memory_size=4, selections_per_chunk=2,
                       ssm_state_size=8, ssm_head_dim=16, ssm_ngroups=2, use_mlp=False, **options)


# The defaults' values of the issue-11 options (V0_OPTIONS holds the original ones).
ISSUE_11 = {"fading_self_key": True, "key_set_bias": True, "learned_selection": True, "eidetic_key_distance": "zero",
            "memory_admission": "window_exit"}

# The original design (v0, V0_OPTIONS) and the defaults (issue 11: the self fading key, the key-set biases, the
# learned selection bias, window-exit admission, eidetic keys at distance 0), and the options one at a time.
CONFIGS = {
    "tiny v0": lambda: (preset_config("tiny", **V0_OPTIONS), 2, 16),
    "tiny": lambda: (preset_config("tiny"), 2, 16),
    "mixed v0": lambda: (_mixed(**V0_OPTIONS), 1, 18),
    "mixed": lambda: (_mixed(), 1, 18),
    # v0 but for one option each
    **{
        f"tiny v0 + {name}": (lambda name=name: (preset_config("tiny", **{**V0_OPTIONS, name: ISSUE_11[name]}), 2, 16))
        for name in ISSUE_11
    },
    # the self fading key alone (no fading window, no memory) over a full window: not the one causal call
    "self key only": lambda: (
        preset_config("tiny", use_fading=False, memory_size=0, selections_per_chunk=0, window_size=64), 1, 13),
    # the paper's predictor (h_t from f_{t-1}, d -> d), and a baseline without a predictor
    "next_input": lambda: (preset_config("tiny", selection_score="next_input"), 1, 16),
    "random": lambda: (preset_config("tiny", selection_score="random"), 1, 16),
    # a Transformer: a window longer than the sequence is one causal SDPA call
    "full attention": lambda: (
        BMojoConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, layers_block_type=["attention"] * 2,
                    num_attention_heads=4, window_size=64, chunk_size=4, memory_size=0, selections_per_chunk=0),
        2,
        20,
    ),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_step_flops_equal_torch_flop_counter_of_the_model(name):
    config, batch, length = CONFIGS[name]()
    torch.manual_seed(0)
    model = BMojoForCausalLM(config)
    ids = torch.randint(0, config.vocab_size, (batch, length))
    fwd, bwd = counted(lambda: model(ids, labels=ids).loss, lambda loss: loss.backward())
    ops = step_ops(config, length, batch, "fp32")
    assert sum(op.fwd.flops for op in ops) == fwd
    assert sum(op.bwd.flops for op in ops) == bwd


@pytest.mark.parametrize("name", ["tiny v0", "tiny"])
def test_projection_flops_equal_each_module_forward(name):
    config, batch, length = CONFIGS[name]()
    model = BMojoForCausalLM(config)
    ids = torch.randint(0, config.vocab_size, (batch, length))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False, custom_mapping=MAPPING) as counter:
        model(ids)
    per_module = {name.split(".")[-1]: 0 for name in counter.get_flop_counts()}
    for name, counts in counter.get_flop_counts().items():
        if "layers." in name:  # leaf modules of every layer, summed over layers
            per_module[name.split(".")[-1]] += sum(counts.values())
    ops = {op.name: op for op in step_ops(config, length, batch, "fp32")}
    # k_proj and v_proj run twice per layer: on the layer input and on the fading tokens.
    attn = sum(per_module[m] for m in ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert ops["attention projections q/k/v/o (+ fading k/v)"].fwd.flops == attn
    assert ops["SSM projections in/out"].fwd.flops == per_module["in_proj"] + per_module["out_proj"]
    assert ops["MLP (SwiGLU)"].fwd.flops == sum(per_module[m] for m in ("gate_proj", "up_proj", "down_proj"))
    # The predictor runs as F.linear on upcast weights inside the mixer (scores in float32): counted alone.
    mixer = model.model.layers[0].mixer
    f_prev = torch.zeros(batch, length, config.hidden_size)
    k = torch.zeros(batch, length, config.num_key_value_heads, config.head_dim)
    predictor, _ = counted(lambda: mixer._innovation(f_prev, k))
    layers = config.layers_block_type.count("bmojo")
    assert ops["eidetic innovation predictor"].fwd.flops == layers * predictor > 0
    # learned_selection's u = Linear(d, 1)(h), also F.linear inside the mixer; with its input gradient (2x).
    if config.learned_selection:
        h = torch.zeros(batch, length, config.hidden_size, requires_grad=True)
        fwd, bwd = counted(lambda: selection_bias_logit(mixer.selection_bias, h), _sum_loss)
        op = ops["learned selection bias u"]
        assert (op.fwd.flops, op.bwd.flops) == (layers * fwd, layers * bwd) and bwd == 2 * fwd > 0
    else:
        assert "learned selection bias u" not in ops


@pytest.mark.parametrize("length, chunk, groups", [(16, 8, 2), (21, 4, 1), (8, 8, 4)])
def test_ssd_flops_equal_the_chunked_op_forward_and_backward(length, chunk, groups):
    batch, heads, head_dim, state = 2, 4, 3, 5
    g = torch.Generator().manual_seed(0)

    def leaf(*shape):
        return torch.randn(*shape, generator=g).requires_grad_()

    x = leaf(batch, length, heads, head_dim)
    B, C = leaf(batch, length, groups, state), leaf(batch, length, groups, state)
    dt = torch.rand(batch, length, heads, generator=g).requires_grad_()
    A, D = leaf(heads), leaf(heads)
    fwd, bwd = counted(lambda: ssd_chunked(x, dt, -A.exp(), B, C, chunk, D=D), _sum_loss)
    op = ssd_op(batch, length, heads, head_dim, groups, state, chunk, 4)
    assert (op.fwd.flops, op.bwd.flops) == (fwd, bwd)
    assert sum(op.parts.values()) == fwd + bwd


@pytest.mark.parametrize(
    "fading, memory, self_key, biases",
    [(True, 3, False, False), (True, 0, False, False), (False, 0, False, False), (False, 3, False, False),
     (True, 3, True, True), (True, 3, True, False), (False, 0, True, True), (False, 3, True, False),
     (True, 0, False, True)],
)
def test_attention_flops_equal_the_chunked_op_forward_and_backward(fading, memory, self_key, biases):
    batch, length, heads, kv_heads, dim, window, chunk = 2, 14, 4, 2, 8, 8, 4
    g = torch.Generator().manual_seed(0)
    n_chunks = -(-length // chunk)

    def leaf(*shape):
        return torch.randn(*shape, generator=g).requires_grad_()

    def pair():
        return leaf(batch, length, kv_heads, dim), leaf(batch, length, kv_heads, dim)

    q, q_eid = leaf(batch, length, heads, dim), leaf(batch, length, heads, dim)
    k, v = pair()
    k_fade, v_fade = pair() if fading else (None,) * 2
    k_self, v_self = pair() if self_key else (None,) * 2
    # key_set_bias: a learned [H] bias per key set present; learned_selection: a learned bias per memory slot
    options = {}
    if biases:
        present = {"fading_bias": fading, "self_bias": self_key, "eidetic_bias": bool(memory)}
        options = {name: leaf(heads) for name, on in present.items() if on}
    mem = None
    if memory:
        pos = torch.randint(0, length, (batch, n_chunks, memory), generator=g)
        mem = EideticMemory(leaf(batch, n_chunks, memory, kv_heads, dim), leaf(batch, n_chunks, memory, kv_heads, dim),
                            pos, torch.rand(batch, n_chunks, memory, generator=g),
                            leaf(batch, n_chunks, memory) if biases else None)
    fwd, bwd = counted(
        lambda: bmojo_attention_chunked(q, k, v, window, chunk, k_fade, v_fade, q_eid if memory else None, mem,
                                        k_self=k_self, v_self=v_self, **options),
        _sum_loss,
    )
    op = attention_op(batch, length, heads, kv_heads, dim, window, chunk, fading, memory, 4, self_key=self_key,
                      key_set_bias=biases, slot_bias=biases and bool(memory))
    assert (op.fwd.flops, op.bwd.flops) == (fwd, bwd)
    assert sum(op.parts.values()) == fwd + bwd
    # the self fading key: C keys per query (the chunk's own fading tokens under a diagonal mask)
    assert ("self fading" in op.parts) == self_key
    if self_key:  # every score a D-wide dot product (the eidetic ones are scored by queries of their own)
        assert op.parts["self fading"] == 3 * 2.0 * batch * n_chunks * heads * chunk * chunk * (dim + dim)


def test_full_window_attention_flops_equal_the_causal_call():
    batch, length, heads, kv_heads, dim = 2, 10, 4, 2, 8
    q = torch.randn(batch, length, heads, dim, requires_grad=True)
    k, v = (torch.randn(batch, length, kv_heads, dim, requires_grad=True) for _ in range(2))
    fwd, bwd = counted(lambda: bmojo_attention_chunked(q, k, v, 64, 4), _sum_loss)
    op = attention_op(batch, length, heads, kv_heads, dim, 64, 4, False, 0, 4)
    assert set(op.parts) == {"causal (full window)"}
    assert (op.fwd.flops, op.bwd.flops) == (fwd, bwd)


@pytest.mark.parametrize("length, chunk, learned, delay", [(16, 4, False, 0), (13, 4, False, 0), (16, 4, True, 2)])
def test_selection_flops_equal_the_chunked_op_forward_and_backward(length, chunk, learned, delay):
    batch, features, picks, capacity = 2, 6, 2, 3
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(batch, length, generator=g)
    k, v = (torch.randn(batch, length, features, generator=g).requires_grad_() for _ in range(2))
    u = torch.randn(batch, length, generator=g).requires_grad_() if learned else None

    def backward(out):
        _, seen = out
        loss = seen.k.square().sum() + seen.v.square().sum()
        (loss + seen.bias.square().sum() if learned else loss).backward()

    fwd, bwd = counted(lambda: select_per_chunk(scores, k, v, chunk, picks, capacity, delay=delay, bias=u), backward)
    op = selection_op(batch, length, features, chunk, picks, capacity, 4, bias=learned, delay=delay)
    assert (op.fwd.flops, op.bwd.flops) == (fwd, bwd)
    plain = selection_op(batch, length, features, chunk, picks, capacity, 4)
    # u: read per token and written per slot, the gradient back; an exp and a product per token
    n_chunks = -(-length // chunk)
    extra = (batch * length + batch * n_chunks * capacity) * 4 if learned else 0
    assert (op.fwd.bytes - plain.fwd.bytes, op.bwd.bytes - plain.bwd.bytes) == (extra, extra)
    assert op.fwd.act - plain.fwd.act == (batch * length if learned else 0)


def _fields(op):
    return {"flops": op.total.flops, "bytes": op.total.bytes, "act": op.total.act, "vec": op.total.vec}


# What each issue-11 option, switched on alone from v0, changes in the step (130m at 2K: the closed-form memory).
OPTION_CHANGES = {
    # one more C-key block per chunk of queries: scores (FLOPs, exps, mask passes) and the self keys/values read
    "fading_self_key": {"attention (window + fading + eidetic)": {"flops", "bytes", "act", "vec"}},
    # per-head biases on the fading and eidetic scores: adds and gradient sums (VectorE), 3 x H parameters
    "key_set_bias": {"attention (window + fading + eidetic)": {"bytes", "vec"},
                     "optimizer step (AdamW)": {"bytes", "act", "vec"}},
    # Linear(d, 1) per layer; score * exp(u) and u carried per slot; u added to the eidetic logits
    "learned_selection": {"learned selection bias u": {"flops", "bytes", "vec"},
                          "eidetic selection + memory": {"bytes", "act", "vec"},
                          "attention (window + fading + eidetic)": {"bytes", "vec"},
                          "optimizer step (AdamW)": {"bytes", "act", "vec"}},
    # the eidetic queries are no longer rotated by 2W
    "eidetic_key_distance": {"norms, rotary, residuals, gating": {"bytes", "vec"}},
    # the closed form ranks the same picks: nothing changes
    "memory_admission": {},
}


@pytest.mark.parametrize("option", sorted(OPTION_CHANGES))
def test_each_default_option_changes_only_the_ops_it_adds_work_to(option):
    v0 = {op.name: _fields(op) for op in step_ops(preset_config("130m", **V0_OPTIONS), 2048)}
    one = {op.name: _fields(op) for op in step_ops(preset_config("130m", **{**V0_OPTIONS, option: ISSUE_11[option]}),
                                                   2048)}
    changed = {}
    for name, fields in one.items():
        before = v0.get(name, dict.fromkeys(fields, 0.0))
        diff = {f for f in fields if fields[f] != before[f]}
        if diff or name not in v0:
            changed[name] = diff
        assert all(fields[f] >= before[f] for f in fields) or option == "eidetic_key_distance"
    expected = {name: fields for name, fields in OPTION_CHANGES[option].items() if fields}
    assert changed == expected
    assert set(v0) <= set(one)


def test_window_exit_admission_merges_fewer_times_in_the_scan():
    # beyond CLOSED_FORM_MAX_PICKS picks the memory is a scan of merges; window exit skips the first W/C of them
    batch, length, features, chunk, picks, capacity = 1, 8192, 16, 4, 2, 8
    now, late = (selection_op(batch, length, features, chunk, picks, capacity, 2, delay=delay) for delay in (0, 3))
    assert now.name == "eidetic selection + merge" and now.total.flops == late.total.flops == 0
    assert now.fwd.vec - late.fwd.vec == batch * 3 * 6 * (capacity + picks) ** 2
    assert (now.fwd.bytes, now.bwd.bytes) == (late.fwd.bytes, late.bwd.bytes)


def test_bf16_autocast_runs_the_ssd_and_attention_matmuls_in_bf16():
    # The convention that prices both ops at the step's dtype: autocast casts their bmm operands (the attention's
    # scores and values: two), except the SSD's two decay prefix sums (chunk-start sums, segsum), which stay float32
    # (ops/ssd/chunk.py, test_ssd.py).
    seen = []

    class Dtypes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.startswith(("bmm", "_scaled_dot_product")):
                seen.append((func.__name__, args[0].dtype))
            return func(*args, **(kwargs or {}))

    x, B = torch.randn(1, 8, 2, 3), torch.randn(1, 8, 1, 4)
    q, k = torch.randn(1, 8, 2, 4), torch.randn(1, 8, 1, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16), Dtypes():
        ssd_chunked(x, torch.rand(1, 8, 2), -torch.rand(2), B, B, 4)
        bmojo_attention_chunked(q, k, k, 4, 4, k, k)
    assert len(seen) == 8 and [dtype for _, dtype in seen] == [torch.float32] * 2 + [torch.bfloat16] * 6


def test_roofline_time_is_the_larger_of_compute_and_memory():
    ops = {op.name: op for op in step_ops(preset_config("130m"), 2048, 1, "bf16")}
    mlp, adamw = ops["MLP (SwiGLU)"], ops["optimizer step (AdamW)"]
    t = op_times(mlp)
    assert t["tensor"] == mlp.total.flops / 92e12 and t["hbm"] == mlp.total.bytes / 410e9
    assert t["roofline"] == max(t["tensor"], t["hbm"]) and t["roofline_bound"] == "compute"
    assert adamw.total.flops == 0 and op_times(adamw)["roofline_bound"] == "memory"
    assert adamw.total.bytes == 7 * 4 * parameter_count(preset_config("130m"))  # 7 float32 reads/writes each
    # pricing the two kernels at fp32 quadruples their TensorE time and nothing else
    fp32 = {op.name: op for op in step_ops(preset_config("130m"), 2048, 1, "bf16", kernel_dtype="fp32")}
    for name, op in ops.items():
        ratio = op_times(fp32[name])["tensor"] / op_times(op)["tensor"] if op.total.flops else 1.0
        assert ratio == pytest.approx(4.0 if op.group in ("ssd", "attention") else 1.0)


@pytest.mark.parametrize("preset", ["cpu", "130m", "370m", "790m", "1.4b"])
def test_total_flops_are_close_to_six_n_t_plus_the_sequence_mixing(preset):
    rep = report(preset)
    # What remains is the fading tokens' second pass through the key/value projections (+), the innovation
    # predictor's detached input (-), the learned selection bias (+, tiny) and the closed-form memory's ranking
    # (+): a few percent.
    assert 1.0 < rep["flops"] / rep["six_nt_plus_mixing"] < 1.08
    assert 0 < rep["ssd_fraction_roofline"] < rep["ssd_fraction_fwd_bwd"] < 1
    assert rep["step_roofline_s"] <= rep["step_time_s"]


def test_cli_json_and_bad_input(capsys):
    assert main(["--preset", "tiny", "--seq-len", "32", "--json"]) == 0
    (rep,) = json.loads(capsys.readouterr().out)
    assert rep["seq_len"] == 32 and rep["machine"] == TRN1.name and rep["ops"][-1]["op"] == "optimizer step (AdamW)"
    for argv, message in (
        (["--dtype", "fp16"], "argument --dtype: invalid choice: 'fp16'"),
        (["--seq-len", "0"], "argument --seq-len: must be a positive integer, got '0'"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(ValueError, match="dtype must be one of"):
        step_ops(preset_config("tiny"), 16, 1, "fp16")
    with pytest.raises(ValueError, match="memory_per_kv_head is not priced"):
        step_ops(preset_config("tiny", memory_per_kv_head=True, key_set_bias=False), 16)


def test_cli_prices_v0_with_options_v0(capsys):
    assert main(["--preset", "130m", "--options", "v0", "--json"]) == 0
    (v0,) = json.loads(capsys.readouterr().out)
    assert v0["options"] == "v0" and v0 == report("130m", options="v0")
    defaults = report("130m")
    v0_ops = {r["op"]: r for r in v0["ops"]}
    # the defaults' only new op is the learned selection bias; the self fading key's scores make attention dearer
    assert {r["op"] for r in defaults["ops"]} - set(v0_ops) == {"learned selection bias u"}
    attention = "attention (window + fading + eidetic)"
    assert next(r for r in defaults["ops"] if r["op"] == attention)["flops_fwd"] > v0_ops[attention]["flops_fwd"]
    with pytest.raises(SystemExit):
        main(["--options", "v1"])
    assert "argument --options: invalid choice: 'v1'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="options must be one of"):
        report("tiny", options="v0+use_fading")


def test_options_v0_plus_a_field_is_v0_with_that_field_at_its_default():
    # the fields are exactly those where the defaults left V0_OPTIONS
    defaults = BMojoConfig()
    assert set(ISSUE_11_FIELDS) == {k for k, v in V0_OPTIONS.items() if getattr(defaults, k) != v} == set(ISSUE_11)
    assert options_config("130m", "defaults").to_dict() == preset_config("130m").to_dict()
    assert options_config("130m", "v0").to_dict() == preset_config("130m", **V0_OPTIONS).to_dict()
    for name in ISSUE_11_FIELDS:
        config = options_config("130m", f"v0+{name}")
        assert config.to_dict() == preset_config("130m", **{**V0_OPTIONS, name: ISSUE_11[name]}).to_dict()
