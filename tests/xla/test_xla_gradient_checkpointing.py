"""Activation checkpointing and selective recompute are refused on an XLA device: XLA's common-subexpression
elimination can merge torch.utils.checkpoint's recomputation back into the forward
(``BMojoModel._refuse_recomputation_on_xla``, ``layers.common.run_op``)."""

import pytest

pytestmark = pytest.mark.xla  # needs torch-xla: run by the XLA tier (scripts/test.sh)

torch_xla = pytest.importorskip("torch_xla")

import torch  # noqa: E402

from bmojo import BMojoForCausalLM, preset_config  # noqa: E402
from bmojo import xla_audit as xa  # noqa: E402


@pytest.mark.parametrize("form", ["gradient_checkpointing", "selective_recompute"])
def test_a_recomputing_training_forward_on_xla_is_one_value_error(form):
    device = torch_xla.device()
    torch.manual_seed(0)
    model = BMojoForCausalLM(preset_config("tiny")).to(device).train()
    getattr(model, f"{form}_enable")()
    x = torch.randint(3, 64, (1, 16)).to(device)
    message = (
        f"{form.replace('_', ' ')} is not supported on XLA devices (XLA's common-subexpression elimination can undo "
        f"torch.utils.checkpoint's recomputation): call model.{form}_disable()"
    )
    torch_xla.sync()
    before = xa.counters()
    with pytest.raises(ValueError) as err:
        model(input_ids=x, labels=x)
    assert str(err.value) == message
    # refused before anything was traced: with the refusal's traceback still held, a sync has no graph to run (a
    # refusal from inside the forward left its traced tensors pending, and a later test's first graph changed)
    torch_xla.sync()
    assert (xa.counters() - before).executed == 0
    with torch.no_grad():  # no backward, nothing to recompute: the forward runs
        assert model(input_ids=x).logits.shape == (1, 16, 64)
