"""A decoding step is bound by the count of ops it dispatches (issue 12): one step runs a bounded number of aten ops
per layer, the same at every context length; what only depends on the positions is made once per step for every
layer; and the shortcuts of eager CPU decoding (no boundary work in a step where no row opens a chunk, ring slots
written by index) compute exactly what the masked forms that a static graph runs compute."""

import collections
import importlib.util
from pathlib import Path

import torch
from support import tiny_model, tokens

from bmojo.cache import BMojoCache
from bmojo.layers import StepInfo
from bmojo.layers.eidetic import EideticState

# The op count is the benchmark's own (scripts/bench_decode_ops.py), so the test and the published numbers agree.
_spec = importlib.util.spec_from_file_location(
    "bench_decode_ops", Path(__file__).parents[1] / "scripts" / "bench_decode_ops.py"
)
bench_decode_ops = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_decode_ops)

# Top-level aten ops of one decoding step per B'MOJO layer (tiny preset, defaults, float32): 490 before issue 12,
# at any position; now 217 where no row opens a chunk and 292 where one does (the memory merge and queue shift).
OPS_PER_LAYER = 230
OPS_PER_LAYER_AT_BOUNDARY = 305


def ops_of_step(model, position: int) -> collections.Counter:
    """Top-level aten ops (no aten op above them) of one decoding step of a row at ``position``, by name."""
    cache = BMojoCache.empty(model.config, 1, dtype=model.dtype)
    token = torch.full((1, 1), 5)
    with torch.no_grad():
        cache.positions.fill_(position)
        model(input_ids=token, cache=cache)  # a first call may set things up
        cache.positions.fill_(position)
        return bench_decode_ops.top_level_aten_ops(model, cache, token, steps=1)


def per_layer(position: int) -> collections.Counter:
    """The ops one more B'MOJO layer adds to a step (two layers minus one)."""
    one, two = (ops_of_step(tiny_model(dtype=torch.float32, num_hidden_layers=n), position) for n in (1, 2))
    two.subtract(one)
    return two


def test_a_decoding_step_runs_a_bounded_number_of_ops_per_layer():
    inside, boundary = per_layer(1025), per_layer(1024)  # chunks of 4: 1024 opens one, 1025 does not
    assert inside.total() <= OPS_PER_LAYER, inside.most_common(12)
    assert boundary.total() <= OPS_PER_LAYER_AT_BOUNDARY, boundary.most_common(12)
    for ops in (inside, boundary):
        assert ops["aten::to"] == 0, "a float32 layer casts nothing (no-op casts are skipped)"
        # The ring slot and the chunk boundary come from the positions: made once per step, not per layer.
        assert ops["aten::remainder"] == 0
        # Fixed-size constants are made once per merge at most (two index ranges each), never from Python values.
        assert ops["aten::lift_fresh"] == 0 and ops["aten::zeros"] == 0
    assert inside["aten::arange"] == 2 and boundary["aten::arange"] == 4  # the token's merge; and the memory's


def test_ops_per_token_do_not_grow_with_the_context():
    model = tiny_model(dtype=torch.float32, num_hidden_layers=3, layers_block_type=["bmojo", "attention", "ssm"])
    # Same phase of the 4-token chunks and the 16-slot ring, contexts 64 times apart.
    for short, long in ((1025, 65537), (1024, 65536)):
        assert ops_of_step(model, short) == ops_of_step(model, long)


def test_the_eager_shortcuts_compute_what_the_masked_forms_compute(monkeypatch):
    """Two rows of different lengths (their chunk boundaries fall in different steps) decoded across several
    boundaries and around the ring, once as eager CPU decoding does (boundary work only in steps where some row
    opens a chunk, the ring slot written by index) and once as a static graph does (masked boundary work in every
    step, the ring selected by the slot mask): the same logits and states, bit for bit."""
    model = tiny_model()
    prompt = tokens(2, 9)
    mask = torch.ones_like(prompt)
    mask[1, :3] = 0  # row 1 is 3 tokens shorter: its boundaries fall 1 step later (chunks of 4 positions)
    steps = tokens(2, 20, seed=2)  # past the 16-slot ring
    calls = []
    boundary_work = EideticState._chunk_boundary
    monkeypatch.setattr(EideticState, "_chunk_boundary", lambda *a, **k: calls.append(1) or boundary_work(*a, **k))

    def decode():
        with torch.no_grad():
            cache = model(prompt, attention_mask=mask, use_cache=True).cache
            logits = [model(input_ids=steps[:, t : t + 1], cache=cache).logits for t in range(steps.shape[1])]
        return torch.cat(logits, dim=1), [layer.tensors() for layer in cache.layers]

    eager = decode()
    skipped = len(calls)
    calls.clear()
    monkeypatch.setattr(StepInfo, "eager_cpu", property(lambda self: False))  # as on XLA or in a traced graph
    masked = decode()
    layers = model.config.num_hidden_layers
    assert len(calls) == steps.shape[1] * layers and 0 < skipped < len(calls)
    assert torch.equal(eager[0], masked[0])
    for a, b in zip(eager[1], masked[1]):
        assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
