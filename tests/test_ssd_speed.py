"""The chunked SSD's backward stays linear in L: its cost relative to the forward must not grow with length.

Indexing ``chunk_states[:, c]`` in the inter-chunk loop made every step's backward materialise a zero tensor of
the whole input (quadratic in the number of chunks: backward/forward 1.7 at 1K, 8.7 at 8K). The test measures
the backward/forward time ratio at 1K and 8K tokens in one run (a ratio, not an absolute time, so a slow or busy
machine does not fail it) with a small head and state so that the inter-chunk loop, not the math, dominates."""

import time

import pytest
import torch

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


def test_backward_forward_ratio_does_not_grow_with_length():
    torch.set_num_threads(1)
    _fwd_bwd_seconds(256, repeats=1)  # warm-up (allocator, kernels)
    ratios = {}
    for length in (1024, 8192):
        fwd, bwd = _fwd_bwd_seconds(length)
        ratios[length] = bwd / fwd
    growth = ratios[8192] / ratios[1024]
    assert growth < 1.5, (
        f"backward/forward time ratio {ratios[1024]:.2f} at 1K -> {ratios[8192]:.2f} at 8K ({growth:.2f}x)"
    )
