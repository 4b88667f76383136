"""Evaluation and decoding on XLA: one graph each, compiled once and reused; a decode loop compiles the same
number of graphs whatever its length; no CPU fallback, no host read, no loop/sort/dynamic shape in the graph."""

import json
import os

import pytest

pytestmark = pytest.mark.xla  # needs torch-xla: run by the XLA tier (scripts/test.sh)

torch_xla = pytest.importorskip("torch_xla")

import torch  # noqa: E402

from bmojo import xla_audit as xa  # noqa: E402
from bmojo import BMojoForCausalLM  # noqa: E402

TOKENS = 64
EVAL_CALLS = 4


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(1)
    return xa.to_xla(BMojoForCausalLM(xa.audit_config())).eval()


@pytest.fixture(scope="module")
def eval_calls(model):
    """Forwards of one shape on fresh data; one delta per call."""
    gen = torch.Generator().manual_seed(2)
    deltas, outputs = [], []
    with torch.no_grad():
        for _ in range(EVAL_CALLS):
            before = xa.counters()
            outputs.append(model(xa.random_ids(gen, model.config.vocab_size).to(xa.device())).logits)
            torch_xla.sync()  # computes the logits held above (an output nobody holds is not computed at all)
            deltas.append(xa.counters() - before)
    return deltas


@pytest.fixture(scope="module")
def padded_eval_calls(model):
    """Left-padded forwards of one shape, each with different padding: the mask is data, not a shape."""
    gen = torch.Generator().manual_seed(3)
    deltas, outputs = [], []
    with torch.no_grad():
        for _ in range(EVAL_CALLS):
            ids = xa.random_ids(gen, model.config.vocab_size).to(xa.device())
            mask = xa.left_padding_mask(gen).to(xa.device())
            before = xa.counters()
            outputs.append(model(ids, attention_mask=mask).logits)
            torch_xla.sync()
            deltas.append(xa.counters() - before)
    return deltas


@pytest.fixture(scope="module", params=["defaults", "v0"])
def decode(request, model):
    """Prefill and decode steps of the audited model (the defaults: every issue-11 option they turn on), and of one
    with the original design (v0)."""
    if request.param == "defaults":
        return xa.run_decode(model, TOKENS)
    torch.manual_seed(1)
    return xa.run_decode(xa.to_xla(BMojoForCausalLM(xa.audit_config(**xa.ORIGINAL_OPTIONS))).eval(), TOKENS)


def test_eval_forward_is_one_graph_compiled_once(eval_calls):
    assert [d.executed for d in eval_calls] == [1] * EVAL_CALLS, "each forward must be exactly one graph"
    assert eval_calls[0].uncached <= 1
    assert [d.uncached for d in eval_calls[1:]] == [0] * (EVAL_CALLS - 1), "new data recompiled the forward"


def test_padded_forward_is_one_graph_whatever_the_padding(padded_eval_calls):
    assert [d.executed for d in padded_eval_calls] == [1] * EVAL_CALLS
    assert [d.uncached for d in padded_eval_calls[1:]] == [0] * (EVAL_CALLS - 1), "new padding recompiled"


def test_prefill_is_one_graph(decode):
    assert decode.prefill.executed == 1 and decode.prefill.uncached <= 1


def test_decode_step_is_one_graph_for_every_position(decode):
    # Positions 10..73 cross 16 chunk boundaries (memory merges), wrap the 16-slot ring buffer several times and
    # evict memory slots: none of it may change the graph.
    assert [d.executed for d in decode.steps] == [1] * TOKENS, "each decode step must be exactly one graph"
    compiled = [d.uncached for d in decode.steps]
    assert sum(compiled) <= 1, f"the decode step compiled {sum(compiled)} graphs: {compiled}"
    # The number of graphs does not grow with the length of the loop.
    assert sum(compiled[:16]) == sum(compiled)


@pytest.mark.parametrize("phase", ["eval", "padded eval", "prefill", "decode"])
def test_inference_never_reads_the_device_or_falls_back_to_cpu(phase, eval_calls, padded_eval_calls, decode):
    deltas = {"eval": eval_calls, "padded eval": padded_eval_calls, "prefill": [decode.prefill], "decode": decode.steps}
    deltas = deltas[phase]
    assert [d.host_reads for d in deltas] == [0] * len(deltas), "the model read a tensor value into Python"
    fallbacks = {name for d in deltas for name in d.fallbacks}
    assert fallbacks <= xa.ALLOWED_FALLBACKS, f"ops run on the CPU: {sorted(fallbacks - xa.ALLOWED_FALLBACKS)}"


def test_decode_graph_hlo_census(decode, report_dir):
    census = xa.hlo_census(decode.hlo)
    with open(os.path.join(report_dir, "decode_step_hlo_census.json"), "w") as f:
        json.dump(census, f, indent=1)
    assert census["opcodes"].get("dot", 0) > 0, "not the decode graph"
    assert xa.census_violations(census) == []
    assert census["data_dependent_slices"] == []
    assert xa.origins(census, "gather", "scatter") <= xa.GATHER_SCATTER_ORIGINS.keys()
