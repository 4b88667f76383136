"""The ``nki`` backend's wiring on XLA:CPU: ``SSDCore`` (the autograd wrapper) with the torch twin in the kernels'
place (``BMOJO_NKI_STANDIN=1``; the same layout contract) gives the chunked path's outputs and gradients on the XLA
device, and a forward+backward step compiles exactly as many graphs as the chunked path does."""

import pytest

pytestmark = pytest.mark.xla

torch_xla = pytest.importorskip("torch_xla")

import torch

from bmojo import xla_audit as xa
from bmojo.ops import dispatch, use_backend
from bmojo.ops.ssd import nki_backend, ssd_chunked

NAMES = ("x", "dt", "A", "B", "C", "D", "initial_state")


def inputs(seed, L=256, H=2, P=16, G=1, N=16):
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(1, L, H, P, generator=g), dt=0.005 + 0.2 * torch.rand(1, L, H, generator=g),
                A=-torch.logspace(-1.7, 0.6, H), B=torch.randn(1, L, G, N, generator=g),
                C=torch.randn(1, L, G, N, generator=g), D=torch.randn(H, generator=g),
                initial_state=torch.randn(1, H, P, N, generator=g))


def step(fn, seed):
    """Forward + backward of ``fn`` on the XLA device; returns (y, state, grads) still on the device."""
    dev = xa.device()
    args = {k: v.to(dev).requires_grad_() for k, v in inputs(seed).items()}
    y, s = fn(**args, chunk_size=128)
    g = torch.Generator().manual_seed(seed + 100)
    dy, ds = torch.randn(y.shape, generator=g).to(dev), torch.randn(s.shape, generator=g).to(dev)
    grads = torch.autograd.grad((y * dy).sum() + (s * ds).sum(), [args[k] for k in NAMES])
    return y, s, grads


def test_wrapper_on_xla_matches_the_chunked_path_with_every_gradient(monkeypatch):
    monkeypatch.setenv("BMOJO_NKI_STANDIN", "1")
    calls = []
    apply = nki_backend.SSDCore.apply
    monkeypatch.setattr(nki_backend.SSDCore, "apply", lambda *a: calls.append(1) or apply(*a))
    with use_backend("nki"):
        got = step(dispatch("ssd"), 0)
    want = step(ssd_chunked, 0)
    torch_xla.sync()
    assert calls == [1]  # the verifier accepted the XLA tensors: the wrapper ran, not the fallback
    for name, a, b in zip(("y", "state", *(f"d{n}" for n in NAMES)), (got[0], got[1], *got[2]),
                          (want[0], want[1], *want[2])):
        a, b = a.cpu(), b.cpu()
        assert (a - b).abs().max() <= 2e-5 * b.abs().max(), name


def test_wrapper_step_compiles_the_same_graphs_as_the_chunked_path(monkeypatch):
    monkeypatch.setenv("BMOJO_NKI_STANDIN", "1")

    def run(fn):
        deltas = []
        for seed in range(4):
            before = xa.counters()
            result = step(fn, seed)  # held across the sync, so the graph computes it
            torch_xla.sync()
            deltas.append(xa.counters() - before)
            del result
        return deltas

    with use_backend("nki"):
        nki_steps = run(dispatch("ssd"))
    chunked_steps = run(ssd_chunked)
    assert [d.uncached for d in nki_steps[1:]] == [0, 0, 0]  # compiled once, then cached
    assert [d.executed for d in nki_steps] == [d.executed for d in chunked_steps] == [1] * 4
    assert [d.host_reads for d in nki_steps] == [0] * 4 and not any(d.fallbacks for d in nki_steps)


def attention_step(fn, seed, L=256, W=128, H=4, Hkv=2, D=16, M=8):
    """Forward + backward of a joint-attention form on the XLA device (memory with some invalid slots)."""
    from bmojo.ops.selection.common import INVALID_SCORE, EideticMemory

    dev = xa.device()
    g = torch.Generator().manual_seed(seed)
    nc = L // 128
    t = {n: torch.randn(1, L, H if n in ("q", "q_eid") else Hkv, D, generator=g).to(dev).requires_grad_()
         for n in ("q", "k", "v", "k_fade", "v_fade", "q_eid")}
    score = torch.rand(1, nc, M, generator=g)
    score[:, :, ::3] = INVALID_SCORE
    mk, mv = (torch.randn(1, nc, M, Hkv, D, generator=g).to(dev).requires_grad_() for _ in range(2))
    memory = EideticMemory(mk, mv, torch.randint(0, L, (1, nc, M), generator=g).to(dev), score.to(dev))
    out = fn(t["q"], t["k"], t["v"], W, 128, t["k_fade"], t["v_fade"], t["q_eid"], memory)
    do = torch.randn(out.shape, generator=g).to(dev)
    return out, torch.autograd.grad((out * do).sum(), [*t.values(), mk, mv])


def test_attention_wrapper_on_xla_matches_the_chunked_path_and_its_graph_counts(monkeypatch):
    from bmojo.ops.attention import bmojo_attention_chunked
    from bmojo.ops.attention import nki_backend as attention_backend

    monkeypatch.setenv("BMOJO_NKI_STANDIN", "1")
    calls = []
    apply = attention_backend.AttentionNKI.apply
    monkeypatch.setattr(attention_backend.AttentionNKI, "apply", lambda *a: calls.append(1) or apply(*a))
    runs = {}
    for label, fn in (("nki", None), ("chunked", bmojo_attention_chunked)):
        deltas, first = [], None
        for seed in range(3):
            before = xa.counters()
            if fn is None:
                with use_backend("nki"):
                    result = attention_step(dispatch("attention"), seed)
            else:
                result = attention_step(fn, seed)
            torch_xla.sync()
            deltas.append(xa.counters() - before)
            first = first or [result[0].cpu(), *(x.cpu() for x in result[1])]
        runs[label] = (deltas, first)
    assert calls == [1, 1, 1]
    for i, (a, b) in enumerate(zip(runs["nki"][1], runs["chunked"][1])):
        assert (a - b).abs().max() <= 2e-5 * b.abs().max(), i
    nki_steps, chunked_steps = runs["nki"][0], runs["chunked"][0]
    assert [d.uncached for d in nki_steps[1:]] == [0, 0]
    assert [d.executed for d in nki_steps] == [d.executed for d in chunked_steps] == [1] * 3
    assert [d.host_reads for d in nki_steps] == [0] * 3 and not any(d.fallbacks for d in nki_steps)
