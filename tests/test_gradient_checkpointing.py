"""Activation (gradient) checkpointing: ``gradient_checkpointing_enable()`` recomputes every decoder block's forward
in the backward and changes no number; it saves only each block's input; it stays off where there is no backward
to replay (eval, no_grad) or where the forward writes a decoding state; bad use is one ValueError."""

import dataclasses
import json

import pytest
import torch
import yaml

import bmojo.layers.bmojo as bmojo_layer
from bmojo.configuration_bmojo import V0_OPTIONS, BMojoConfig
from bmojo.modeling_bmojo import BMojoModel
from support import cli, one_error_line, repeated_text, tiny_model, tokens, train_args

# core: must also pass on the trn1 stack (torch 2.9 + transformers 4.57, which binds use_reentrant=True by default).
pytestmark = pytest.mark.core

MIXED = ["bmojo", "attention", "ssm", "bmojo"]


def _enable(model, **kwargs):
    """The public switch: transformers 5.x's ``activation_checkpointing_enable`` (its ``gradient_`` name is a
    deprecated alias there), 4.57's ``gradient_checkpointing_enable``."""
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)(**kwargs)
    return model


def _disable(model):
    (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()


def _step(model, x, mask=None):
    """One training forward and backward: (loss, lm loss, innovation loss, hidden states, every gradient). The
    hidden states enter the loss too, so gradients also flow through the per-layer outputs."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids=x, attention_mask=mask, labels=x, output_hidden_states=True)
    (out.loss + 1e-3 * sum(h.square().mean() for h in out.hidden_states)).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), out.lm_loss.detach(), out.innovation_loss, [h.detach() for h in out.hidden_states], grads


CASES = {
    # the defaults (learned selection, key-prediction scores with the innovation loss, self fading key, key-set
    # biases), every layer type, MLP on
    "defaults, every layer type": dict(num_hidden_layers=4, layers_block_type=MIXED),
    # the random baseline: the score hashes positions and token ids, so a recomputation must see the same ids
    "random selection": dict(selection_score="random", layers_block_type=["bmojo", "bmojo"]),
    # MLP off, per-head memories, document resets, next-input scores; run below with a left-padded batch
    "no MLP, per head, documents": dict(
        use_mlp=False, memory_per_kv_head=True, key_set_bias=False, memory_reset_at_document=True,
        selection_score="next_input", eos_token_id=5, layers_block_type=["bmojo", "ssm"],
    ),  # fmt: skip
    "v0 options": dict(V0_OPTIONS, layers_block_type=["bmojo", "attention"]),
}


@pytest.mark.parametrize("overrides", CASES.values(), ids=CASES.keys())
def test_checkpointing_changes_no_loss_and_no_gradient(overrides):
    model = tiny_model(**overrides).train()
    x = tokens(2, 36)  # past the window (8): fading keys and eidetic memory are in play
    x[0, 11] = x[1, 20] = 5  # an end-of-document token (memory_reset_at_document in one case)
    mask = torch.ones_like(x)
    mask[1, :5] = 0  # left padding: the rows are rolled inside the forward
    plain = _step(model, x, mask)
    _enable(model)
    assert all(block.gradient_checkpointing for block in model.model.layers)
    checkpointed = _step(model, x, mask)
    has_innovation = overrides.get("selection_score", "key_prediction") in ("key_prediction", "next_input")
    assert (plain[2] is not None) == has_innovation and (checkpointed[2] is not None) == has_innovation
    assert checkpointed[2] is None or checkpointed[2].requires_grad  # the auxiliary loss still trains its predictor
    assert set(checkpointed[4]) == set(plain[4]) == {n for n, p in model.named_parameters()}
    # float64; the recomputation repeats the same operations on the same inputs
    torch.testing.assert_close(checkpointed[:4], plain[:4], rtol=1e-12, atol=1e-12)
    for name, grad in plain[4].items():
        torch.testing.assert_close(checkpointed[4][name], grad, rtol=1e-12, atol=1e-12, msg=name)


def _count_forwards(model) -> dict[str, int]:
    """Calls of every block's and every mixer's forward (forward pre-hooks: they fire in the recomputation too)."""
    calls = {}
    for i, block in enumerate(model.model.layers):
        for name, module in ((f"block {i}", block), (f"mixer {i}", block.mixer)):
            calls[name] = 0
            module.register_forward_pre_hook(lambda m, args, name=name: calls.__setitem__(name, calls[name] + 1))
    return calls


def test_each_layer_runs_twice_per_step_and_selection_picks_the_same_tokens(monkeypatch):
    model = _enable(tiny_model(selection_score="random", num_hidden_layers=3, layers_block_type=MIXED[:3]).train())
    calls = _count_forwards(model)
    picks = []

    def recording_select(*args, **kwargs):
        result = bmojo_layer_select(*args, **kwargs)
        picks.append(result[0])
        return result

    bmojo_layer_select = bmojo_layer.select
    monkeypatch.setattr(bmojo_layer, "select", recording_select)
    x = tokens(2, 32)
    loss = model(input_ids=x, labels=x).loss
    assert set(calls.values()) == {1} and len(picks) == 1  # the forward: once each (one bmojo layer)
    loss.backward()
    assert set(calls.values()) == {2}  # the backward ran every block's forward again, mixer included
    assert len(picks) == 2  # ... and the recomputation selected the same tokens, slot for slot
    for field in picks[0]._fields:
        first, again = getattr(picks[0], field), getattr(picks[1], field)
        assert (first is None and again is None) or torch.equal(first, again), field


def _tensors(obj) -> list[torch.Tensor]:
    if torch.is_tensor(obj):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    if dataclasses.is_dataclass(obj):
        return [t for f in dataclasses.fields(obj) for t in _tensors(getattr(obj, f.name))]
    return []


def _saved_bytes(model, x, monkeypatch) -> dict[str, dict[int, int]]:
    """What a training forward keeps for the backward, as ``{storage: bytes}`` (parameters excluded; as
    scripts/bench_throughput.py's ``activation_bytes``): ``inside`` / ``outside`` the blocks, saved through
    ``saved_tensors_hooks`` (inside a checkpointed block, checkpointing's own hooks take over), and what the
    checkpointed blocks are given: their input ``x`` (which torch's checkpoint saves through the outer hooks too) and
    the sequence info (tensors it holds without saving them: positions, rotary angles, ...)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    parts = {"inside": {}, "outside": {}, "given x": {}, "given info": {}}
    depth = [0]

    def record(part, t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            parts[part][storage.data_ptr()] = storage.nbytes()

    def pack(t):
        record("inside" if depth[0] else "outside", t)
        return t

    for block in model.model.layers:
        block.register_forward_pre_hook(lambda *_: depth.__setitem__(0, depth[0] + 1))
        block.register_forward_hook(lambda *_: depth.__setitem__(0, depth[0] - 1))
        func = getattr(block, "_gradient_checkpointing_func", None)
        if func is not None:

            def given(function, h, info, func=func):
                record("given x", h)
                for t in _tensors(info):
                    record("given info", t)
                return func(function, h, info)

            monkeypatch.setattr(block, "_gradient_checkpointing_func", given)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=x, labels=x)
    return parts


def _total(parts: dict[str, dict[int, int]], *names: str) -> int:
    union = {}
    for name in names or parts:
        union.update(parts[name])
    return sum(union.values())


def test_only_each_blocks_input_is_kept(monkeypatch):
    layers, (bsz, length) = 4, (2, 64)
    model = tiny_model(num_hidden_layers=layers, layers_block_type=MIXED).train()
    x = tokens(bsz, length)
    plain = _saved_bytes(model, x, monkeypatch)
    _enable(model)
    checkpointed = _saved_bytes(model, x, monkeypatch)
    assert not plain["given x"] and not plain["given info"]
    assert not checkpointed["inside"]  # nothing inside a checkpointed block is saved ...
    inputs = layers * bsz * length * model.config.hidden_size * 8  # one [B, L, d] float64 input per block
    assert _total(checkpointed, "given x") == inputs
    # ... the rest of the model saves what it did, and checkpointing adds the blocks' inputs
    assert set(checkpointed["given x"]) <= set(checkpointed["outside"])
    assert _total(checkpointed, "outside") == _total(plain, "outside") + inputs
    # Without checkpointing a block saves the inputs of its norms and projections, q/k/v, the attention's and the
    # SSD's intermediates and the MLP's activations: about 60 tensors of [B, L, d]'s size at this shape (float64),
    # at least 20 assumed here. With it a block keeps one [B, L, d] input, and the sequence info (positions, rotary
    # angles: < one [B, L, d] in all) is shared by all blocks. So the blocks' part drops below a twentieth ...
    assert _total(checkpointed, "given info") < inputs / layers
    assert _total(checkpointed, "given x", "given info") < _total(plain, "inside") / 20
    # ... and outside the blocks (embedding ids, final norm, logits and loss at vocab 64 = 2 d: about 5 [B, L, d])
    # the same bytes are saved either way, under a twentieth of the plain total; so the total drops below a tenth.
    assert _total(plain, "outside") < _total(plain) / 20
    assert _total(checkpointed) < _total(plain) / 10, (_total(checkpointed), _total(plain))


def test_off_in_eval_without_grad_for_decoding_and_for_a_prefill_that_collects_the_state(monkeypatch):
    model = _enable(tiny_model(layers_block_type=["bmojo", "ssm"]).train())
    calls = _count_forwards(model)
    checkpoints = [0]
    for block in model.model.layers:

        def counting(function, *args, func=block._gradient_checkpointing_func):
            checkpoints[0] += 1
            return func(function, *args)

        monkeypatch.setattr(block, "_gradient_checkpointing_func", counting)
    x = tokens(1, 20)

    def calls_after(run) -> tuple[int, int]:
        """(forwards of block 0, checkpointed block calls) that ``run`` made."""
        before = calls["block 0"], checkpoints[0]
        run()
        return calls["block 0"] - before[0], checkpoints[0] - before[1]

    def train_step(**kwargs):
        return lambda: model(input_ids=x, labels=x, **kwargs).loss.backward()

    assert calls_after(train_step()) == (2, 2)  # checkpointed: forward + recomputation, both blocks
    model.eval()
    assert calls_after(train_step()) == (1, 0)  # eval mode: no checkpointing
    model.train()
    with torch.no_grad():
        assert calls_after(lambda: model(input_ids=x)) == (1, 0)  # no backward to replay
    # A prefill that collects the decoding state runs as is (a warning says so): the state is the plain one.
    assert calls_after(train_step(use_cache=True)) == (1, 0)
    caches = []
    assert calls_after(lambda: caches.append(model(input_ids=x, use_cache=True).cache)) == (1, 0)
    _disable(model)
    assert not any(block.gradient_checkpointing for block in model.model.layers)
    assert calls_after(train_step()) == (1, 0)
    plain = model(input_ids=x, use_cache=True).cache
    for layer, (a, b) in enumerate(zip(caches[0].layers, plain.layers)):
        for name, t in a.tensors().items():
            torch.testing.assert_close(t, b.tensors()[name], rtol=0, atol=0, msg=f"layer {layer} {name}")
    # Decoding from a cache (training mode, gradients on) goes step by step and updates the cache in place: the
    # blocks' forward is not called, nothing is checkpointed, and it continues as from the plain state.
    _enable(model)
    nxt, logits = tokens(1, 3, seed=2), []
    assert calls_after(lambda: logits.append(model(input_ids=nxt, cache=caches[0]).logits)) == (0, 0)
    assert logits[0].requires_grad
    torch.testing.assert_close(logits[0], model(input_ids=nxt, cache=plain).logits, rtol=0, atol=0)


def test_the_checkpoint_is_non_reentrant_and_every_n_layers_marks_every_nth_block():
    model = tiny_model(num_hidden_layers=4, layers_block_type=MIXED)
    kwargs = {"use_reentrant": True, "preserve_rng_state": False}  # True: transformers 4.57's default
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5.x
        model.activation_checkpointing_enable(kwargs, every_n_layers=3)
        assert [block.gradient_checkpointing for block in model.model.layers] == [True, False, False, True]
    else:
        model.gradient_checkpointing_enable(kwargs)
        assert all(block.gradient_checkpointing for block in model.model.layers)
    (func,) = {block._gradient_checkpointing_func for block in model.model.layers}
    assert func.func is torch.utils.checkpoint.checkpoint
    assert func.keywords == {"use_reentrant": False, "preserve_rng_state": False}  # the model binds False
    model._set_gradient_checkpointing(True, torch.utils.checkpoint.checkpoint)  # a bare function: bound too
    assert model.model.layers[1]._gradient_checkpointing_func.keywords == {"use_reentrant": False}


def test_bad_use_is_one_value_error():
    from bmojo.parallel.memory import _MeasuringBackend
    from bmojo.parallel.tensor_parallel import shard_model

    model = tiny_model()
    with pytest.raises(ValueError, match=r"^every_n_layers must be an integer >= 1, got 0$"):
        model._set_gradient_checkpointing(True, every_n_layers=0)
    # tensor parallelism (rank 0 of 2, sharded without collectives), in either order
    sharded = shard_model(tiny_model(ssm_ngroups=2), 0, 2, backend=_MeasuringBackend(2))
    with pytest.raises(ValueError, match=r"^gradient checkpointing is not supported with tensor parallelism \("):
        _enable(sharded)
    with pytest.raises(ValueError, match=r"^gradient checkpointing is not supported with tensor parallelism: call"):
        shard_model(_enable(tiny_model(ssm_ngroups=2)), 0, 2, backend=_MeasuringBackend(2))
    assert not any(block.gradient_checkpointing for block in sharded.model.layers)


# --- bmojo train --gradient-checkpointing ------------------------------------------------------------------------
def _train_losses(run) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if row["split"] == "train"]


def _corpus(tmp_path):
    (tmp_path / "corpus").mkdir()  # beside the runs, not above them (a data folder is read recursively)
    return repeated_text(tmp_path / "corpus")


def test_train_flag_checkpoints_every_layer_and_changes_no_number(tmp_path, monkeypatch):
    corpus = _corpus(tmp_path)
    assert cli(train_args(corpus, tmp_path / "plain", "--steps", "2")) == 0
    checkpointed = []
    choose = BMojoModel._checkpointed_layers

    def recording(self, *args):
        chosen = choose(self, *args)
        checkpointed.append(len(chosen))
        return chosen

    monkeypatch.setattr(BMojoModel, "_checkpointed_layers", recording)
    run = tmp_path / "checkpointed"
    assert cli(train_args(corpus, run, "--steps", "2", "--gradient-checkpointing")) == 0
    layers = BMojoConfig.from_pretrained(run).num_hidden_layers
    assert checkpointed.count(layers) == 2  # the two training steps checkpointed every layer (evaluation: none)
    assert yaml.safe_load((run / "train_config.yaml").read_text())["gradient_checkpointing"] is True
    assert _train_losses(run) == _train_losses(tmp_path / "plain")  # float32, one thread: the same numbers


@pytest.mark.parametrize("field", ["gradient_checkpointing", "selective_recompute"])
def test_train_flag_is_refused_with_tensor_parallelism(field, tmp_path, capsys):
    flag = "--" + field.replace("_", "-")
    corpus = _corpus(tmp_path)
    assert cli(train_args(corpus, tmp_path / "run", flag, "--tp", "2")) == 2
    assert one_error_line(capsys) == f"train.{field} ({flag}) is not supported with --tp 2"
    assert not (tmp_path / "run" / "checkpoints").exists()


# --- selective recompute: the attention and SSD ops only ---------------------------------------------------------
def _op_probe(monkeypatch):
    """Wrap the ops the mixers run through ``run_op``: count each op's calls and record the storages that autograd
    saves while the op runs (``inside``) and outside it, as ``_saved_bytes`` does for the blocks."""
    import bmojo.layers.common as mixer_common

    calls = {op: 0 for op in mixer_common.RECOMPUTABLE_OPS}
    depth = [0]
    given = {}  # storage -> bytes of every tensor the ops were given (what a recomputation must keep)

    def probing(op):
        fn = mixer_common_dispatch(op)

        def run(*args, **kwargs):
            calls[op] += 1
            for t in _tensors([*args, *kwargs.values()]):
                given[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            depth[0] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                depth[0] -= 1

        return run

    mixer_common_dispatch = mixer_common.dispatch
    monkeypatch.setattr(mixer_common, "dispatch", probing)
    return calls, depth, given


def _saved_around_ops(model, x, depth) -> dict[str, int]:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    parts = {"inside": {}, "outside": {}}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            parts["inside" if depth[0] else "outside"][storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=x, labels=x).loss
    union = {**parts["inside"], **parts["outside"]}
    return {
        "inside": sum(parts["inside"].values()),
        "outside": sum(parts["outside"].values()),
        "total": sum(union.values()),
        "loss": loss,
    }


@pytest.mark.parametrize("overrides", CASES.values(), ids=CASES.keys())
def test_selective_recompute_changes_no_loss_and_no_gradient(overrides):
    model = tiny_model(**overrides).train()
    x = tokens(2, 36)
    x[0, 11] = x[1, 20] = 5
    mask = torch.ones_like(x)
    mask[1, :5] = 0
    plain = _step(model, x, mask)
    model.selective_recompute_enable()
    mixers = [m for m in model.modules() if hasattr(m, "recompute_ops")]
    assert mixers and all(m.recompute_ops == {"attention", "ssd"} for m in mixers)
    recomputed = _step(model, x, mask)
    _enable(model)  # and both together: the block's recomputation recomputes its ops once more in the backward
    both = _step(model, x, mask)
    for run in (recomputed, both):
        assert set(run[4]) == set(plain[4]) == {n for n, p in model.named_parameters()}
        torch.testing.assert_close(run[:4], plain[:4], rtol=1e-12, atol=1e-12)
        for name, grad in plain[4].items():
            torch.testing.assert_close(run[4][name], grad, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("ops", [("attention", "ssd"), ("attention",), ("ssd",)])
def test_selective_recompute_keeps_nothing_of_the_ops_and_runs_them_again_in_the_backward(ops, monkeypatch):
    calls, depth, given = _op_probe(monkeypatch)
    # every layer type: attention layers run the attention op, ssm layers the SSD op, bmojo layers both
    model = tiny_model(num_hidden_layers=4, layers_block_type=MIXED).train()
    runs = {"attention": 3, "ssd": 3}  # per forward: bmojo, attention, bmojo / bmojo, ssm, bmojo
    x = tokens(2, 64)
    plain = _saved_around_ops(model, x, depth)
    plain["loss"].backward()
    assert calls == runs  # the backward of the plain model runs no op again
    assert plain["inside"] > plain["total"] / 3  # the ops' intermediates: a large part of what a step keeps
    model.selective_recompute_enable(ops)
    for op in calls:
        calls[op] = 0
    given.clear()
    recomputed = _saved_around_ops(model, x, depth)
    assert calls == runs  # the forward: once each
    recomputed["loss"].backward()
    assert calls == {op: n * (2 if op in ops else 1) for op, n in runs.items()}  # the backward recomputed `ops`
    # A recomputed op saves nothing (checkpoint's own hooks take its intermediates and drop them) but keeps its inputs
    # as saved tensors (the layer's q/k/v, fading keys, memory, the SSD's x/dt/B/C: of [B, L, d]'s order, a few times
    # smaller than what the ops kept inside); the others save what they did; everything else is saved as before.
    if ops == ("attention", "ssd"):
        assert recomputed["inside"] == 0
        inputs = sum(given.values())
        assert inputs < plain["inside"] / 3
        assert recomputed["total"] <= plain["outside"] + inputs
    else:
        assert 0 < recomputed["inside"] < plain["inside"]
        assert recomputed["total"] < plain["total"]
    torch.testing.assert_close(recomputed["loss"], plain["loss"], rtol=0, atol=0)


@pytest.mark.parametrize("nesting", ["tuple", "eidetic memory", "keyword dict"])
def test_a_layer_checkpoint_drops_the_tensors_a_recomputed_op_is_given_nested(nesting, monkeypatch):
    """Both on (activation checkpointing + selective recompute): the layer's checkpoint drops what the layer's
    forward made, including the tensors its recomputed ops are given inside tuples, named tuples and dicts (a
    block's pieces, the eidetic memory). ``torch.utils.checkpoint`` holds a non-tensor argument as it is until the
    backward, so ``run_op`` passes each nested tensor as an input of its own; the numbers are unchanged."""
    import weakref

    import bmojo.layers.common as mixer_common
    from bmojo.ops.selection import EideticMemory

    def op(*args, **kwargs):  # a product of the two tensors, however they are passed
        a, b = {
            "tuple": lambda: args[0],
            "eidetic memory": lambda: (args[0].k, args[0].v),
            "keyword dict": lambda: (kwargs["pieces"]["a"], kwargs["pieces"]["b"]),
        }[nesting]()
        return (a * b).sum(-1) * 2.0

    monkeypatch.setattr(mixer_common, "dispatch", lambda name: op)
    mixer = torch.nn.Module().train()
    mixer.recompute_ops = {"attention"}
    made = []

    def layer(x):
        y = x.exp()  # made in the layer's forward, read only by the op
        made.append(weakref.ref(y))
        if nesting == "tuple":
            return mixer_common.run_op(mixer, "attention", (y, x))
        if nesting == "eidetic memory":
            pos = torch.zeros(x.shape, dtype=torch.long)
            return mixer_common.run_op(mixer, "attention", EideticMemory(y, x, pos, torch.zeros(x.shape)))
        return mixer_common.run_op(mixer, "attention", pieces={"a": y, "b": x})

    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    out = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
    assert made[0]() is None  # dropped after the forward, made again in the backward
    out.square().sum().backward()
    expected = torch.autograd.grad(((x.exp() * x).sum(-1) * 2.0).square().sum(), x)[0]
    torch.testing.assert_close(x.grad, expected, rtol=1e-12, atol=1e-12)


def test_selective_recompute_is_off_in_eval_and_without_grad(monkeypatch):
    calls, _, _ = _op_probe(monkeypatch)
    model = tiny_model(layers_block_type=["bmojo", "ssm"]).train()
    model.selective_recompute_enable()
    x = tokens(1, 20)

    def ssd_calls(run) -> int:
        before = calls["ssd"]
        run()
        return calls["ssd"] - before

    def train_step():
        model(input_ids=x, labels=x).loss.backward()

    assert ssd_calls(train_step) == 4  # two SSM blocks, forward and recomputation
    model.eval()
    assert ssd_calls(train_step) == 2  # eval mode: nothing recomputed
    model.train()
    with torch.no_grad():
        assert ssd_calls(lambda: model(input_ids=x)) == 2
    model.selective_recompute_disable()
    assert not any(m.recompute_ops for m in model.modules() if hasattr(m, "recompute_ops"))
    assert ssd_calls(train_step) == 2


def test_selective_recompute_bad_use_is_one_value_error():
    from bmojo.parallel.memory import _MeasuringBackend
    from bmojo.parallel.tensor_parallel import shard_model

    model = tiny_model()
    with pytest.raises(ValueError, match=r"^selective recompute: unknown op 'mlp'; choose from attention, ssd$"):
        model.selective_recompute_enable(("attention", "mlp"))
    for ops, message in (
        ((), r"^selective recompute: no op given; choose from attention, ssd \(selective_recompute_disable\(\) turns"),
        (None, r"^selective recompute: ops must be op names \(attention, ssd\), got None$"),
        (b"ssd", r"^selective recompute: ops must be op names \(attention, ssd\), got b'ssd'$"),
        ([3], r"^selective recompute: unknown op 3; choose from attention, ssd$"),
    ):
        with pytest.raises(ValueError, match=message):
            model.selective_recompute_enable(ops)
    assert not any(m.recompute_ops for m in model.modules() if hasattr(m, "recompute_ops"))  # nothing half-set
    model.selective_recompute_enable("ssd")  # one name alone is one op, not its letters
    assert {m.recompute_ops for m in model.modules() if hasattr(m, "recompute_ops")} == {frozenset({"ssd"})}
    sharded = shard_model(tiny_model(ssm_ngroups=2), 0, 2, backend=_MeasuringBackend(2))
    with pytest.raises(ValueError, match=r"^selective recompute is not supported with tensor parallelism \("):
        sharded.selective_recompute_enable()
    plain = tiny_model(ssm_ngroups=2)
    plain.selective_recompute_enable()
    with pytest.raises(ValueError, match=r"^selective recompute is not supported with tensor parallelism: call"):
        shard_model(plain, 0, 2, backend=_MeasuringBackend(2))


def test_train_flag_recomputes_the_ops_and_changes_no_number(tmp_path, monkeypatch):
    corpus = _corpus(tmp_path)
    assert cli(train_args(corpus, tmp_path / "plain", "--steps", "2")) == 0
    calls, _, _ = _op_probe(monkeypatch)
    run = tmp_path / "recomputed"
    assert cli(train_args(corpus, run, "--steps", "2", "--selective-recompute")) == 0
    assert yaml.safe_load((run / "train_config.yaml").read_text())["selective_recompute"] is True
    assert _train_losses(run) == _train_losses(tmp_path / "plain")  # float32, one thread: the same numbers
    calls_recomputed = dict(calls)
    for op in calls:
        calls[op] = 0
    assert cli(train_args(corpus, tmp_path / "plain2", "--steps", "2")) == 0
    # the same evaluations, and each training step's ops once more
    assert calls_recomputed["attention"] > calls["attention"] and calls_recomputed["ssd"] > calls["ssd"]
