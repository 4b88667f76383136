"""Tensor parallelism: TP=2 (two gloo processes on CPU) computes what TP=1 computes; checkpoints convert
between TP degrees; the sharding rules cut the packed SSM projections where the model's layout says."""

import sys
import types
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from bmojo import BMojoForCausalLM, preset_config
from bmojo.errors import BMojoError
from bmojo.parallel import (
    ParallelContext,
    check_tp_size,
    clip_grad_norm_,
    merge_state_dicts,
    parameter_rules,
    setup_tensor_parallel,
    shard_model,
    split_state_dict,
    zero1_optimizer,
)
from bmojo.parallel import convert
from bmojo.parallel.neuron import NeuronBackend, NeuronTraining, neuron_available
from bmojo.parallel.tensor_parallel import resolve_backend

# core: must also pass on the trn1 stack (torch 2.9 + transformers 4.57); the XLA tier runs it there too.
pytestmark = pytest.mark.core

# Every feature on (fading, eidetic memory, per-head key-set biases, MLP, GQA, tied embeddings, query/key/value
# biases) and every layer type; two SSM groups so that TP=2 splits groups as well as heads.
# learned_selection=False here: the original selection; LEARNED below covers the defaults' learned selection bias
# (its gradient summed over the ranks, test_tp2_equals_tp1_with_learned_selection).
MIXED = dict(
    layers_block_type=["bmojo", "attention", "ssm"], num_hidden_layers=3, ssm_ngroups=2, key_set_bias=True,
    key_set_bias_init=-0.5, attention_bias=True, learned_selection=False,
)
MAX_NORM = 0.05  # below the gradient norm (checked): clipping is active
# The candidate defaults: learned_selection's replicated selection_bias feeds every rank's own eidetic heads.
LEARNED = dict(
    learned_selection=True, eidetic_key_distance="zero", fading_self_key=True, memory_admission="window_exit"
)


def _config(**overrides):
    return preset_config("tiny", **{**MIXED, **overrides})


def _model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = BMojoForCausalLM(_config(**overrides)).to(torch.float64)
    if model.config.learned_selection:  # a non-neutral bias u (it starts at zero), different for every token
        generator = torch.Generator().manual_seed(seed + 7)
        with torch.no_grad():
            for layer in model.model.layers:
                if hasattr(layer.mixer, "selection_bias"):
                    layer.mixer.selection_bias.weight.normal_(0, 1, generator=generator)
                    layer.mixer.selection_bias.bias.fill_(0.3)
    return model


def _batch():
    ids = torch.randint(3, 64, (2, 24), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row: padding paths of the SSM, the score and the aux loss
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def _train_and_decode(model, clip):
    """forward + backward, clip, one AdamW step, then a prefill and 4 decoding steps with the updated weights."""
    ids, mask, labels = _batch()
    out = model(ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    names = ("loss", "lm_loss", "innovation_loss", "logits")
    result = {name: getattr(out, name).detach() for name in names if getattr(out, name) is not None}
    result["grads"] = {n: p.grad.clone() for n, p in model.named_parameters()}
    result["grad_norm"] = clip(model.parameters(), MAX_NORM)
    torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1).step()
    result["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.eval()
    with torch.no_grad():
        prefill = model(ids[:, :20], attention_mask=mask[:, :20], use_cache=True)
        steps = model(ids[:, 20:], cache=prefill.cache)
    result["decoded"] = torch.cat([prefill.logits[:, -1:], steps.logits], dim=1)
    return result


def _zero_steps(optimizer_for):
    """Two AdamW steps on the full model, the optimizer built by ``optimizer_for(params)``."""
    model = _model()
    opt = optimizer_for(model.parameters())
    ids, mask, labels = _batch()
    for _ in range(2):
        opt.zero_grad()
        model(ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _adamw(params):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)


def _worker(rank, world, store, out_dir, overrides, zero):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=timedelta(seconds=120)
    )
    try:
        model = _model(**overrides)
        ctx = setup_tensor_parallel(model, tp_size=world)
        result = _train_and_decode(model, lambda params, max_norm: clip_grad_norm_(params, max_norm, ctx))
        if zero:  # ZeRO-1: the two ranks as data-parallel replicas of the full model, optimizer state split
            dp = ParallelContext(0, 1, None, rank, world, None)
            result["zero"] = _zero_steps(lambda params: zero1_optimizer(params, dp, lr=1e-2, weight_decay=0.1))
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _tp2_and_tp1(out, overrides=None, zero=False):
    """Two gloo ranks' results (TP=2) and the full model's (TP=1), for ``_model(**overrides)``."""
    overrides = overrides or {}
    torch.multiprocessing.spawn(_worker, args=(2, str(out / "store"), str(out), overrides, zero), nprocs=2)
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(2)]
    return _train_and_decode(_model(**overrides), torch.nn.utils.clip_grad_norm_), ranks


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return _tp2_and_tp1(tmp_path_factory.mktemp("tp"), zero=True)


def _close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-11)


# --- TP=2 == TP=1 ---------------------------------------------------------------------------------------------------
def test_tp2_losses_and_logits_equal_tp1(runs):
    ref, ranks = runs
    assert ref["innovation_loss"] > 0
    for result in ranks:  # replicated on every rank
        for name in ("loss", "lm_loss", "innovation_loss", "logits"):
            _close(result[name], ref[name])


def test_tp2_gradients_merged_by_the_rules_equal_tp1(runs):
    ref, ranks = runs
    config = _config()
    q = "model.layers.0.mixer.q_proj.weight"
    assert ranks[0]["grads"][q].shape[0] == ref["grads"][q].shape[0] // 2  # each rank holds half the heads
    merged = merge_state_dicts([r["grads"] for r in ranks], config)  # replicated gradients must agree across ranks
    assert merged.keys() == ref["grads"].keys()
    for name, grad in ref["grads"].items():
        _close(merged[name], grad)
    # The innovation predictor is trained only by the aux loss through the all-reduced score: its gradient is
    # neither zero nor scaled by the TP degree.
    predictor = "model.layers.0.mixer.innovation_predictor.weight"
    assert ref["grads"][predictor].abs().max() > 1e-6
    _close(merged[predictor], ref["grads"][predictor])


def test_tp2_clipping_and_adamw_step_equal_tp1(runs):
    ref, ranks = runs
    assert ref["grad_norm"] > MAX_NORM
    for result in ranks:
        _close(result["grad_norm"], ref["grad_norm"])
    merged = merge_state_dicts([r["params"] for r in ranks], _config())
    for name, param in ref["params"].items():
        _close(merged[name], param)


def test_tp2_decoding_after_prefill_equals_tp1(runs):
    """Eidetic memory slots hold each rank's key/value heads; the selection is the same on every rank."""
    ref, ranks = runs
    for result in ranks:
        _close(result["decoded"], ref["decoded"])


def test_tp2_equals_tp1_with_learned_selection(tmp_path):
    """``selection_bias`` is replicated but each rank's heads read its ``u``: the backward sums ``u``'s gradient
    over the ranks, so the bias layer's gradient (and the layer input's, through it) is the full model's on every
    rank; forward, selection and decoding agree as well."""
    ref, ranks = _tp2_and_tp1(tmp_path, LEARNED)
    config = _config(**LEARNED)
    assert ref["innovation_loss"] > 0
    for result in ranks:
        for name in ("loss", "lm_loss", "innovation_loss", "logits"):
            _close(result[name], ref[name])
    for part in ("weight", "bias"):  # trained by the LM loss through the eidetic logits: not zero, not halved
        name = f"model.layers.0.mixer.selection_bias.{part}"
        assert ref["grads"][name].abs().max() > 1e-4
        for result in ranks:
            _close(result["grads"][name], ref["grads"][name])
    merged = merge_state_dicts([r["grads"] for r in ranks], config)  # replicated gradients agree across ranks
    assert merged.keys() == ref["grads"].keys()
    for name, grad in ref["grads"].items():
        _close(merged[name], grad)
    for result in ranks:  # clipping, the AdamW step and decoding with the updated weights
        for name in ("grad_norm", "decoded"):
            _close(result[name], ref[name])
    merged = merge_state_dicts([r["params"] for r in ranks], config)
    for name, param in ref["params"].items():
        _close(merged[name], param)


def test_tp2_equals_tp1_with_random_scores(tmp_path):
    """``selection_score="random"``: every rank hashes the same (layer, position, token id), so its heads keep the
    full model's tokens; the left-padded row's tokens keep their own ids (forward, gradients, decoding)."""
    ref, ranks = _tp2_and_tp1(tmp_path, dict(selection_score="random"))
    assert "innovation_loss" not in ref  # no predictor, no auxiliary loss
    for result in ranks:
        for name in ("loss", "lm_loss", "logits", "grad_norm", "decoded"):
            _close(result[name], ref[name])


def test_zero1_update_equals_adamw(runs):
    _, ranks = runs
    expected = _zero_steps(_adamw)
    for result in ranks:
        for name, param in expected.items():
            _close(result["zero"][name], param)


# --- sharding rules -------------------------------------------------------------------------------------------------
def test_ssm_input_projection_and_conv_are_cut_per_segment():
    config = _config()  # inner 64, 4 heads, 2 groups of N=8
    rules = parameter_rules(config)
    rows = torch.arange(64 + 64 + 16 + 16 + 4, dtype=torch.float64)[:, None]  # row index as value
    z, x, b, c, dt = rows.split([64, 64, 16, 16, 4])
    for rank in range(2):
        got = rules["model.layers.2.mixer.in_proj.weight"].local(rows, rank, 2)
        half = slice(32 * rank, 32 * (rank + 1))
        group = slice(8 * rank, 8 * (rank + 1))
        heads = slice(2 * rank, 2 * (rank + 1))
        assert torch.equal(got, torch.cat([z[half], x[half], b[group], c[group], dt[heads]]))
        conv = rules["model.layers.0.mixer.ssm.conv1d.weight"].local(rows[64:-4], rank, 2)
        assert torch.equal(conv, torch.cat([x[half], b[group], c[group]]))
    assert rules["model.layers.1.mixer.o_proj.weight"].dim == 1  # row-parallel: input columns
    assert rules["model.layers.2.mixer.out_proj.weight"].dim == 1
    assert not any(k.startswith("model.embed") or k.startswith("lm_head") or "_norm" in k for k in rules)
    model_keys = set(_model().state_dict())
    assert set(rules) <= model_keys


def test_split_then_merge_is_exact():
    full = _model().state_dict()
    config = _config()
    shards = split_state_dict(full, config, 2)
    assert shards[0]["model.layers.2.mixer.A_log"].shape == (2,)
    assert shards[1]["model.layers.0.mixer.eidetic_bias"].shape == (2,)  # key-set biases: by query head
    merged = merge_state_dicts(shards, config)
    assert merged.keys() == full.keys()
    assert all(torch.equal(merged[k], full[k]) for k in full)


def test_tp2_shards_resplit_to_tp4():
    config = _config(num_key_value_heads=4, ssm_ngroups=4)
    full = _model(num_key_value_heads=4, ssm_ngroups=4).state_dict()
    tp2 = split_state_dict(full, config, 2)
    tp4 = split_state_dict(merge_state_dicts(tp2, config), config, 4)
    direct = split_state_dict(full, config, 4)
    assert all(torch.equal(tp4[r][k], direct[r][k]) for r in range(4) for k in full)
    assert all(torch.equal(merge_state_dicts(tp4, config)[k], full[k]) for k in full)


def test_tp2_checkpoint_converted_to_tp1_gives_the_original_logits(tmp_path):
    model = _model().float().eval()  # float32: the dtype from_pretrained restores on every transformers version
    model.save_pretrained(tmp_path / "full")
    assert convert.main(["--in", str(tmp_path / "full"), "--out", str(tmp_path / "tp2"), "--tp", "2"]) == 0
    assert sorted(p.name for p in (tmp_path / "tp2").glob("*.safetensors")) == [
        "model-tp0-of-2.safetensors",
        "model-tp1-of-2.safetensors",
    ]
    assert convert.main(["--in", str(tmp_path / "tp2"), "--out", str(tmp_path / "tp1"), "--tp", "1"]) == 0
    loaded = BMojoForCausalLM.from_pretrained(tmp_path / "tp1").eval()
    ids, mask, _ = _batch()
    with torch.no_grad():
        assert torch.equal(loaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)
    sd = convert.rank_state_dict(tmp_path / "full", 1, 2)  # a rank's tensors straight from a full checkpoint
    assert torch.equal(sd["model.layers.1.mixer.k_proj.weight"], model.model.layers[1].mixer.k_proj.weight[8:])


def test_convert_refuses_an_indivisible_degree_and_a_used_output(tmp_path, capsys):
    _model().save_pretrained(tmp_path / "full")
    assert convert.main(["--in", str(tmp_path / "full"), "--out", str(tmp_path / "tp3"), "--tp", "3"]) == 2
    assert "num_attention_heads" in capsys.readouterr().err
    assert not (tmp_path / "tp3" / "config.json").exists()  # nothing written
    assert convert.main(["--in", str(tmp_path / "full"), "--out", str(tmp_path / "full2"), "--tp", "1"]) == 0
    assert convert.main(["--in", str(tmp_path / "full"), "--out", str(tmp_path / "full2"), "--tp", "2"]) == 2
    assert "already holds model weights" in capsys.readouterr().err


@pytest.mark.parametrize(
    "field, tp, overrides",
    [
        ("num_attention_heads", 3, {}),
        ("num_key_value_heads", 4, {"ssm_ngroups": 4}),
        ("ssm_num_heads", 4, {"num_key_value_heads": 4, "ssm_head_dim": 32, "ssm_ngroups": 1}),
        ("ssm_ngroups", 2, {"ssm_ngroups": 1}),
        ("intermediate_size", 2, {"intermediate_size": 63}),
    ],
)
def test_indivisible_sizes_name_the_field(field, tp, overrides):
    with pytest.raises(ValueError, match=field):
        check_tp_size(_config(**overrides), tp)
    with pytest.raises(ValueError, match=field):
        shard_model(_model(**overrides), 0, tp)


def test_fields_of_absent_modules_do_not_constrain_the_degree():
    # all-SSM, no MLP: head counts of attention and the MLP width do not matter
    config = _config(
        layers_block_type=["ssm"] * 3, ssm_ngroups=4, num_key_value_heads=1, use_mlp=False, intermediate_size=63
    )
    check_tp_size(config, 4)


def test_tp1_leaves_the_model_alone():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert shard_model(model, 0, 1) is model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# --- backends -------------------------------------------------------------------------------------------------------
def test_neuron_backend_requested_without_neuronx_distributed_is_a_clear_error():
    assert not neuron_available()
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(BMojoError, match="neuronx_distributed"):
        shard_model(model, 0, 2, backend="neuron")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched
    with pytest.raises(BMojoError, match="trains through neuronx-distributed, which does not import here"):
        NeuronTraining(2, zero1=True, max_grad_norm=1.0)
    with pytest.raises(BMojoError, match="init_process_group"):
        resolve_backend("auto")  # no NxD here -> torch.distributed, which is not initialised in this process
    with pytest.raises(ValueError, match="unknown tensor-parallel backend"):
        resolve_backend("mpi")


def _fake_nxd(monkeypatch, tp_size):
    """Just enough of neuronx_distributed's surface to build layers: they allocate their local shard from the
    full sizes, as NxD's do. No collectives: this checks what the neuron backend hands to NxD, not the math."""

    class _Parallel(torch.nn.Module):
        def __init__(self, weight_shape, bias_size, dtype, device):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(weight_shape, dtype=dtype, device=device))
            self.bias = torch.nn.Parameter(torch.zeros(bias_size, dtype=dtype)) if bias_size else None

    class ColumnParallelLinear(_Parallel):
        def __init__(self, input_size, output_size, bias=True, gather_output=True, dtype=None, device=None):
            assert gather_output is False
            super().__init__((output_size // tp_size, input_size), bias and output_size // tp_size, dtype, device)

    class RowParallelLinear(_Parallel):
        def __init__(self, input_size, output_size, bias=True, input_is_parallel=False, dtype=None, device=None):
            assert input_is_parallel is True
            super().__init__((output_size, input_size // tp_size), bias and output_size, dtype, device)

    nxd = types.ModuleType("neuronx_distributed")
    nxd.parallel_layers = types.ModuleType("neuronx_distributed.parallel_layers")
    nxd.parallel_layers.layers = types.SimpleNamespace(
        ColumnParallelLinear=ColumnParallelLinear, RowParallelLinear=RowParallelLinear
    )
    nxd.parallel_layers.mappings = types.SimpleNamespace(
        reduce_from_tensor_model_parallel_region=lambda x: x, copy_to_tensor_model_parallel_region=lambda x: x
    )
    nxd.parallel_layers.parallel_state = types.SimpleNamespace(
        get_tensor_model_parallel_rank=lambda: 1, get_tensor_model_parallel_size=lambda: tp_size
    )
    monkeypatch.setitem(sys.modules, "neuronx_distributed", nxd)
    monkeypatch.setitem(sys.modules, "neuronx_distributed.parallel_layers", nxd.parallel_layers)


def test_neuron_backend_fills_nxd_layers_with_the_same_slices(monkeypatch):
    _fake_nxd(monkeypatch, 2)
    assert neuron_available()
    backend = NeuronBackend()
    rank, size = backend.rank_and_size()
    model = _model()
    expected = split_state_dict(model.state_dict(), model.config, size)[rank]
    shard_model(model, rank, size, backend=backend)
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    attn = model.model.layers[0].mixer
    assert type(attn.q_proj).__name__ == "ColumnParallelLinear" and type(attn.o_proj).__name__ == "RowParallelLinear"
    assert attn.innovation_predictor.bias.shape == (8,)
    assert attn.sum_over_shards == backend.sum_over_shards
    learned = shard_model(_model(**LEARNED), rank, size, backend=backend).model.layers[0].mixer
    assert learned.selection_bias_gradient_sum.reduce == backend.copy_to_shards  # Megatron's f on u
    assert (attn.num_heads, attn.num_kv, attn.key_features) == (2, 1, 16)  # the score still averages all features
    ssm = model.model.layers[2].mixer
    assert (ssm.inner, ssm.heads, ssm.groups, ssm.conv_dim, ssm.norm.groups) == (32, 2, 1, 48, 1)
    assert ssm.A_log.tensor_model_parallel and ssm.A_log.partition_dim == 0
