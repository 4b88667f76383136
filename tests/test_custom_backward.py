"""The ops' own autograd Functions (a backward of their own) run exactly when a gradient is to be computed, and never
inside ``torch.jit.trace`` (the CPU stand-in of the trn1 export, which cannot record a Python Function): one rule,
``ops.common.custom_backward_applies``, for every Function that only replaces the backward of plain ops (the NKI
kernels' and the tensor-parallel collectives' Functions are the op itself and always run). Each case below checks both
sides for one call site, and that both give the same values."""

import pytest
import torch

from bmojo.ops.attention import chunk as attention_chunk
from bmojo.ops.attention import common as attention_common
from bmojo.ops.common import custom_backward_applies
from bmojo.ops.ssd import chunk as ssd_chunk


def _decay_exp(x):
    return ssd_chunk.decay_exp(-x.abs() * 30)


def _concat_windows(x):
    blocks = x.reshape(1, 6, 2, 1, 4)  # [B, blocks, C, Hkv, D]: windows of 3 blocks for 4 chunks
    return attention_chunk._concat_windows([(blocks, 3)], heads_first=True)


def _join(x):
    return attention_common._join(tuple(x.split(16, dim=1)))


# call site -> the name of its Function's backward node
CASES = {
    "decay_exp": (_decay_exp, "_DecayExpBackward"),
    "concat_windows": (_concat_windows, "_ConcatWindowsBackward"),
    "join_pieces": (_join, "_JoinPiecesBackward"),
}


def _input(requires_grad):
    return torch.randn(1, 48, generator=torch.Generator().manual_seed(0), dtype=torch.float64).requires_grad_(
        requires_grad
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_function_used_when_a_gradient_is_computed(case):
    fn, node = CASES[case]
    out = fn(_input(True))
    assert type(out.grad_fn).__name__ == node


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "input_without_grad"])
def test_plain_ops_when_no_gradient_is_computed(case, mode):
    fn, node = CASES[case]
    want = fn(_input(True)).detach()
    if mode == "input_without_grad":
        out = fn(_input(False))
    else:
        with torch.no_grad() if mode == "no_grad" else torch.inference_mode():
            out = fn(_input(True))
    assert out.grad_fn is None
    torch.testing.assert_close(out, want, rtol=0, atol=0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_traced_graph_records_no_python_function(case):
    """Traced with an input that requires grad (a traced model's parameters do): plain ops in the graph."""
    fn, _ = CASES[case]
    x = _input(True)
    traced = torch.jit.trace(fn, (x,), check_trace=False)
    kinds = {n.kind() for n in traced.graph.nodes()}
    assert "prim::PythonOp" not in kinds
    torch.testing.assert_close(traced(x), fn(x), rtol=0, atol=0)


def test_rule():
    x, y = torch.zeros(2), torch.zeros(2, requires_grad=True)
    assert not custom_backward_applies(x)
    assert custom_backward_applies(x, y)
    with torch.no_grad():
        assert not custom_backward_applies(y)
