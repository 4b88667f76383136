"""``sequence_block_size`` is eager-only: on an XLA device the attention and SSD ops are traced whole (one call
per layer), the graph the XLA tier audits; the same model on the CPU runs them in blocks."""

import pytest

pytestmark = pytest.mark.xla  # needs torch-xla: run by the XLA tier (scripts/test.sh)

torch_xla = pytest.importorskip("torch_xla")

import torch  # noqa: E402

import bmojo.layers.common as common  # noqa: E402
from bmojo import BMojoForCausalLM, preset_config  # noqa: E402


def test_the_sequence_ops_are_traced_whole_on_xla_and_run_in_blocks_on_the_cpu(monkeypatch):
    calls, scans = [], []
    real = common.dispatch

    def probe(op):
        fn = real(op)
        if op == "ssd":
            return lambda *a, **kw: scans.append(a[0].shape[1]) or fn(*a, **kw)
        if op == "attention":  # (the queries computed, the length of the inputs)
            return lambda *a, **kw: calls.append((kw.get("query_range"), a[0].shape[1])) or fn(*a, **kw)
        return fn

    monkeypatch.setattr(common, "dispatch", probe)
    torch.manual_seed(0)
    model = BMojoForCausalLM(preset_config("tiny", sequence_block_size=8)).eval()
    layers = sum(t in ("attention", "bmojo") for t in model.config.layers_block_type)
    ssm_layers = sum(t in ("ssm", "bmojo") for t in model.config.layers_block_type)
    x = torch.randint(3, 64, (1, 32))
    with torch.no_grad():
        cpu = model(input_ids=x).logits
    # blocks of 8 queries, each on the inputs its keys reach (2W = 16 positions before it)
    blocks = [((0, 8), 8), ((8, 16), 16), ((16, 24), 24), ((16, 24), 24)]
    assert calls == blocks * layers and scans == [8] * 4 * ssm_layers
    calls.clear()
    scans.clear()
    device = torch_xla.device()
    with torch.no_grad():
        on_xla = model.to(device)(input_ids=x.to(device)).logits.cpu()
    assert calls == [(None, 32)] * layers and scans == [32] * ssm_layers
    torch.testing.assert_close(on_xla, cpu, rtol=1e-4, atol=1e-4)
