"""The chunked SSD's backward stays linear in L: its cost relative to the forward must not grow with length.

Two tests of the same fault: the bytes the backward allocates (deterministic, ``torch.profiler``: they grow 8x from
1K to 8K tokens when linear, 60x with the indexing form below), for the SSD and for the eidetic memory's chunk scan
(``memory_per_chunk``, the same loop pattern); and the time ratio the issue asked for (load-sensitive: under a load
of 5 on 2 cores it measured 1.6x, so it is repeated once before it fails).

Indexing ``chunk_states[:, c]`` in the inter-chunk loop made every step's backward materialise a zero tensor of
the whole input (quadratic in the number of chunks: backward/forward 1.7 at 1K, 8.7 at 8K). The test measures
the backward/forward time ratio at 1K and 8K tokens in one run (a ratio, not an absolute time, so a slow or busy
machine does not fail it) with a small head and state so that the inter-chunk loop, not the math, dominates."""

import time

import pytest
import torch

from bmojo.ops.selection import Slots, memory_per_chunk
from bmojo.ops.ssd.chunk import ssd_chunked

pytestmark = pytest.mark.core


def _fwd_bwd_seconds(length: int, repeats: int = 5) -> tuple[float, float]:
    gen = torch.Generator().manual_seed(length)
    heads, head_dim, state, chunk = 2, 16, 16, 8  # 1,024 chunks at 8K: old code 3.4x growth
    x = torch.randn(1, length, heads, head_dim, generator=gen, requires_grad=True)
    dt = (torch.rand(1, length, heads, generator=gen) * 0.1).requires_grad_()
    A = -torch.rand(heads, generator=gen) - 0.5
    B = torch.randn(1, length, 1, state, generator=gen, requires_grad=True)
    C = torch.randn(1, length, 1, state, generator=gen, requires_grad=True)
    fwd, bwd = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        y, s = ssd_chunked(x, dt, A, B, C, chunk)
        loss = y.square().sum() + s.square().sum()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        fwd.append(t1 - t0)
        bwd.append(t2 - t1)
    return min(fwd), min(bwd)  # the least disturbed repetition of each


def _backward_bytes(loss: torch.Tensor) -> int:
    """Bytes allocated during ``loss.backward()`` (every allocation counted, frees ignored)."""
    with torch.profiler.profile(profile_memory=True) as prof:
        loss.backward()
    return sum(max(e.self_cpu_memory_usage, 0) for e in prof.events())


def _ssd_loss(length: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(length)
    heads, head_dim, state, chunk = 2, 16, 16, 8
    x = torch.randn(1, length, heads, head_dim, generator=gen, requires_grad=True)
    dt = (torch.rand(1, length, heads, generator=gen) * 0.1).requires_grad_()
    A = -torch.rand(heads, generator=gen) - 0.5
    B = torch.randn(1, length, 1, state, generator=gen, requires_grad=True)
    C = torch.randn(1, length, 1, state, generator=gen, requires_grad=True)
    y, s = ssd_chunked(x, dt, A, B, C, chunk)
    return y.square().sum() + s.square().sum()


def _memory_scan_loss(length: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(length)
    chunk, picks, capacity, features = 4, 2, 16, 8
    chunks = length // chunk
    k = torch.randn(1, chunks, picks, features, generator=gen, requires_grad=True)
    v = torch.randn(1, chunks, picks, features, generator=gen, requires_grad=True)
    pos = (torch.arange(chunks)[:, None] * chunk + torch.arange(picks)).expand(1, -1, -1)
    score = torch.rand(1, chunks, picks, generator=gen)
    seen, final = memory_per_chunk(Slots(k, v, pos, score), capacity)
    return seen.k.square().sum() + seen.v.square().sum() + final.k.sum()


@pytest.mark.parametrize("loss_at", [_ssd_loss, _memory_scan_loss], ids=["ssd_chunked", "memory_per_chunk"])
def test_backward_allocations_grow_linearly_with_length(loss_at):
    small, large = _backward_bytes(loss_at(1024)), _backward_bytes(loss_at(8192))
    # linear: 8x the tokens, 8x the bytes. Measured: SSD 8.00x; memory scan 10.8x (linear to 4K, then autograd
    # accumulates one gradient out of place: +2 MB of adds). Indexing one chunk per step instead of unbind views
    # (the fault): SSD 60x. The bound, twice linear, separates the two kinds.
    assert large / small < 16, f"backward allocations grow {large / small:.1f}x from 1K to 8K tokens (linear: 8x)"


def _growth() -> tuple[float, dict]:
    ratios = {}
    for length in (1024, 8192):
        fwd, bwd = _fwd_bwd_seconds(length)
        ratios[length] = bwd / fwd
    return ratios[8192] / ratios[1024], ratios


def test_backward_forward_ratio_does_not_grow_with_length():
    torch.set_num_threads(1)
    _fwd_bwd_seconds(256, repeats=1)  # warm-up (allocator, kernels)
    growth, ratios = _growth()
    if growth >= 1.5:  # one more try: a busy machine can slow one length's backward more than the other's
        growth, ratios = _growth()
    assert growth < 1.5, (
        f"backward/forward time ratio {ratios[1024]:.2f} at 1K -> {ratios[8192]:.2f} at 8K ({growth:.2f}x)"
    )
