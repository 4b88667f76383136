"""Specification of bmojo.ops.conv: causal depthwise conv, its step form and state helper."""

import pytest
import torch

from bmojo.ops.conv import causal_conv1d, causal_conv1d_ref, causal_conv1d_step, conv_state_from_inputs


def naive_conv(x, weight, bias=None, initial_state=None):
    """Independent loop reference written straight from the formula (per channel, per t)."""
    batch, L, D = x.shape
    K = weight.shape[1]
    y = torch.zeros(batch, L, D, dtype=x.dtype)
    for t in range(L):
        for k in range(K):
            s = t - K + 1 + k
            if s >= 0:
                y[:, t] += weight[:, k] * x[:, s]
            elif initial_state is not None:
                y[:, t] += weight[:, k] * initial_state[:, :, K - 1 + s]
        if bias is not None:
            y[:, t] += bias
    return y


def make(batch=3, L=20, D=5, K=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, L, D, generator=g, dtype=dtype)
    w = torch.randn(D, K, generator=g, dtype=dtype)
    b = torch.randn(D, generator=g, dtype=dtype)
    s0 = torch.randn(batch, D, K - 1, generator=g, dtype=dtype)
    return x, w, b, s0


@pytest.mark.parametrize("K", [1, 2, 4])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("init", [False, True])
def test_conv_matches_naive_loop(K, bias, init):
    x, w, b, s0 = make(K=K, seed=K)
    b = b if bias else None
    s0 = s0 if init else None
    y = causal_conv1d(x, w, b, initial_state=s0)
    # contiguous in [b, L, D]: the SSM's silu and gates, and their backwards, run on it (a transposed view made
    # silu's backward ~10x slower)
    assert y.shape == x.shape and y.dtype == x.dtype and y.is_contiguous()
    torch.testing.assert_close(y, naive_conv(x, w, b, s0), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(causal_conv1d_ref(x, w, b, s0), naive_conv(x, w, b, s0), atol=1e-12, rtol=1e-12)


def test_conv_is_causal():
    x, w, b, _ = make(seed=1)
    y = causal_conv1d(x, w, b)
    x2 = x.clone()
    x2[:, 12:] = torch.randn_like(x2[:, 12:])
    y2 = causal_conv1d(x2, w, b)
    torch.testing.assert_close(y2[:, :12], y[:, :12], atol=0, rtol=0)
    assert not torch.allclose(y2[:, 12:], y[:, 12:])


def test_conv_grads_match_loop():
    x, w, b, s0 = make(L=9, seed=2)
    leaves_a = [t.clone().requires_grad_() for t in (x, w, b, s0)]
    leaves_b = [t.clone().requires_grad_() for t in (x, w, b, s0)]
    dy = torch.randn_like(x)
    (causal_conv1d(*leaves_a[:3], initial_state=leaves_a[3]) * dy).sum().backward()
    (causal_conv1d_ref(*leaves_b[:3], initial_state=leaves_b[3]) * dy).sum().backward()
    for a, r in zip(leaves_a, leaves_b):
        torch.testing.assert_close(a.grad, r.grad, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("K", [2, 4])
@pytest.mark.parametrize("cut", [1, 2, 3, 5, 19])
def test_split_sequence_with_state_equals_whole(K, cut):
    # cut < K-1 exercises the zero fill of conv_state_from_inputs.
    x, w, b, _ = make(K=K, seed=3)
    y = causal_conv1d(x, w, b)
    x1, x2 = x[:, :cut], x[:, cut:]
    y1 = causal_conv1d(x1, w, b)
    lengths = torch.full((x.shape[0],), cut, dtype=torch.long)
    state = conv_state_from_inputs(x1, lengths, K)
    assert state.shape == (x.shape[0], x.shape[2], K - 1)
    y2 = causal_conv1d(x2, w, b, initial_state=state)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, atol=1e-12, rtol=1e-12)


def test_three_way_split_carries_initial_state():
    # Middle piece shorter than K-1: its state must include inputs from the first piece.
    K = 4
    x, w, b, _ = make(K=K, seed=4)
    y = causal_conv1d(x, w, b)
    pieces = [x[:, :6], x[:, 6:7], x[:, 7:]]
    state, ys = None, []
    for p in pieces:
        ys.append(causal_conv1d(p, w, b, initial_state=state))
        lengths = torch.full((x.shape[0],), p.shape[1], dtype=torch.long)
        state = conv_state_from_inputs(p, lengths, K, initial_state=state)
    torch.testing.assert_close(torch.cat(ys, 1), y, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(state, x[:, -(K - 1) :].transpose(1, 2), atol=0, rtol=0)


@pytest.mark.parametrize("K", [1, 2, 4])
@pytest.mark.parametrize("init", [False, True])
def test_step_iterated_equals_conv(K, init):
    x, w, b, s0 = make(K=K, seed=5 + K)
    s0 = s0 if init else None
    y = causal_conv1d(x, w, b, initial_state=s0)
    state = s0.clone() if init else torch.zeros(x.shape[0], x.shape[2], K - 1, dtype=x.dtype)
    ys = []
    for t in range(x.shape[1]):
        before = state.clone()
        y_t, new_state = causal_conv1d_step(state, x[:, t], w, b)
        assert torch.equal(state, before), "causal_conv1d_step must not modify its input state"
        assert new_state.shape == state.shape and y_t.shape == x[:, t].shape
        state = new_state
        ys.append(y_t)
    torch.testing.assert_close(torch.stack(ys, 1), y, atol=1e-12, rtol=1e-12)
    # The state after stepping is the last K-1 inputs, as conv_state_from_inputs says.
    full = torch.full((x.shape[0],), x.shape[1], dtype=torch.long)
    torch.testing.assert_close(state, conv_state_from_inputs(x, full, K, initial_state=s0), atol=0, rtol=0)


@pytest.mark.parametrize("K", [1, 2, 4])
def test_state_from_right_padded_rows(K):
    batch, L, D = 6, 10, 5
    g = torch.Generator().manual_seed(6)
    x = torch.randn(batch, L, D, generator=g, dtype=torch.float64)  # padding is garbage, not zeros
    lengths = torch.tensor([0, 1, 2, 3, 7, 10])
    s0 = torch.randn(batch, D, K - 1, generator=g, dtype=torch.float64)
    state = conv_state_from_inputs(x, lengths, K)
    state_init = conv_state_from_inputs(x, lengths, K, initial_state=s0)
    assert state.shape == state_init.shape == (batch, D, K - 1)
    for i in range(batch):
        n = int(lengths[i])
        # Per-row, unpadded: the last K-1 entries of (zeros or s0) followed by the valid inputs.
        hist0 = torch.cat([torch.zeros(K - 1, D, dtype=x.dtype), x[i, :n]], 0)
        hist1 = torch.cat([s0[i].T, x[i, :n]], 0)
        torch.testing.assert_close(state[i], hist0[hist0.shape[0] - (K - 1) :].T, atol=0, rtol=0)
        torch.testing.assert_close(state_init[i], hist1[hist1.shape[0] - (K - 1) :].T, atol=0, rtol=0)
        # ...and it is the state that continues the row's conv correctly.
        if n > 0:
            nxt = torch.randn(1, 4, D, generator=g, dtype=x.dtype)
            whole = causal_conv1d(torch.cat([x[i : i + 1, :n], nxt], 1), *make(D=D, K=K, seed=7)[1:3])
            cont = causal_conv1d(nxt, *make(D=D, K=K, seed=7)[1:3], initial_state=state[i : i + 1])
            torch.testing.assert_close(cont, whole[:, n:], atol=1e-12, rtol=1e-12)


def test_bf16_dtypes():
    x, w, b, s0 = make(dtype=torch.float32, seed=8)
    xb = x.bfloat16()
    y = causal_conv1d(xb, w, b, initial_state=s0)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), causal_conv1d(xb.float(), w, b, initial_state=s0), atol=5e-2, rtol=2e-2)
    y_t, st = causal_conv1d_step(s0, xb[:, 0], w, b)
    assert y_t.dtype == torch.bfloat16 and st.dtype == s0.dtype
