"""Activation checkpointing and selective recompute on an XLA device run through ``torch_xla.utils.checkpoint``
(``layers.common.recompute``): the same losses and gradients as without; the recomputation is in the step's graph
behind optimization barriers (without them XLA's common-subexpression elimination can merge it back into the
forward, which is why plain ``torch.utils.checkpoint`` is not used there); and a training loop with both on still
compiles one graph per step, reads nothing back, falls back to the CPU for nothing and passes the HLO census.

What this cannot show on the CPU: that neuronx-cc keeps the recomputation after its own passes (the barriers are
XLA's documented way to keep it) and how much HBM it saves on trn1."""

import copy
import math

import pytest

pytestmark = pytest.mark.xla  # needs torch-xla: run by the XLA tier (scripts/test.sh)

torch_xla = pytest.importorskip("torch_xla")

import torch  # noqa: E402

from bmojo import BMojoForCausalLM  # noqa: E402
from bmojo import xla_audit as xa  # noqa: E402

FORMS = {
    "gradient checkpointing": lambda m: m.gradient_checkpointing_enable(),
    "selective recompute": lambda m: m.selective_recompute_enable(),
    "both": lambda m: (m.gradient_checkpointing_enable(), m.selective_recompute_enable()),
}
STEPS, WARMUP = 5, 2


def _step(model, ids):
    """One forward and backward on XLA -> (loss, gradients by name, on the host; the traced graph's HLO census)."""
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    hlo = torch_xla._XLAC._get_xla_tensors_hlo([loss, *grads.values()])
    torch_xla.sync()
    return loss.cpu(), {name: g.cpu() for name, g in grads.items()}, xa.hlo_census(hlo)


@pytest.mark.parametrize("form", FORMS)
def test_recomputation_on_xla_changes_no_number_and_stays_in_the_graph(form):
    torch.manual_seed(0)
    plain = BMojoForCausalLM(xa.audit_config())
    recomputing = copy.deepcopy(plain)
    FORMS[form](recomputing)
    ids = torch.randint(3, plain.config.vocab_size, (2, xa.LENGTH)).to(xa.device())
    loss, grads, census = _step(xa.to_xla(plain).train(), ids)
    loss_r, grads_r, census_r = _step(xa.to_xla(recomputing).train(), ids)
    torch.testing.assert_close(loss_r, loss, rtol=1e-6, atol=1e-6)
    assert grads_r.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grads_r[name], grad, rtol=1e-4, atol=1e-5, msg=name)
    # the recomputation is traced (more matrix products and exponentials than the plain step's) and fenced off
    assert "opt-barrier" not in census["opcodes"] and census_r["opcodes"]["opt-barrier"] > 0
    assert census_r["opcodes"]["dot"] > census["opcodes"]["dot"]
    assert census_r["opcodes"]["exponential"] > census["opcodes"]["exponential"]


def test_a_training_loop_with_both_is_one_clean_graph_per_step():
    torch.manual_seed(0)
    model = BMojoForCausalLM(xa.audit_config())
    FORMS["both"](model)
    run = xa.run_training(xa.to_xla(model), STEPS)
    assert [s.executed for s in run.steps] == [1] * STEPS
    assert [s.uncached for s in run.steps[WARMUP:]] == [0] * (STEPS - WARMUP), "a steady-state step compiled"
    assert [s.host_reads for s in run.steps] == [0] * STEPS
    fallbacks = {name for s in run.steps for name in s.fallbacks}
    assert fallbacks <= xa.ALLOWED_FALLBACKS, f"ops run on the CPU: {sorted(fallbacks - xa.ALLOWED_FALLBACKS)}"
    census = xa.hlo_census(run.hlo)
    assert xa.census_violations(census) == [] and census["data_dependent_slices"] == []
    assert census["opcodes"].get("opt-barrier", 0) > 0
    vocab = model.config.vocab_size
    assert all(0.5 * math.log(vocab) < loss < 2 * math.log(vocab) for loss in run.losses), run.losses


@pytest.mark.parametrize("trainable", ["new", "ssm,norm"])
def test_checkpointed_layers_on_xla_get_their_gradients_with_frozen_embeddings(trainable):
    """Priming trains some parts with the embeddings frozen: no input of a checkpointed layer then requires a
    gradient, and torch_xla's (reentrant) checkpoint would skip the layer's backward (no gradient for its
    parameters, or no graph to backward at all). ``recompute`` passes a tensor that requires one."""
    from bmojo.priming import set_trainable

    torch.manual_seed(0)
    plain = BMojoForCausalLM(xa.audit_config())
    set_trainable(plain, trainable)
    checkpointed = copy.deepcopy(plain)
    checkpointed.gradient_checkpointing_enable()
    ids = torch.randint(3, plain.config.vocab_size, (2, xa.LENGTH)).to(xa.device())
    loss, grads, _ = _step(xa.to_xla(plain).train(), ids)
    loss_c, grads_c, census = _step(xa.to_xla(checkpointed).train(), ids)
    trained = {name for name, p in plain.named_parameters() if p.requires_grad}
    assert not plain.model.embed_tokens.weight.requires_grad and trained
    assert grads.keys() == grads_c.keys() == trained
    torch.testing.assert_close(loss_c, loss, rtol=1e-6, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_c[name], grad, rtol=1e-4, atol=1e-5, msg=name)
    assert census["opcodes"]["opt-barrier"] > 0
