"""SSD chunked scan, forward and backward, as Beta-1 NKI kernels for trn1 (``neuronxcc.nki``, Neuron SDK 2.28).

Importing this module imports ``neuronxcc``: only ``ops/ssd/nki_backend.py`` does so, and only when the ``nki``
backend runs on a Neuron device. The CPU tests run this same source through a NumPy stand-in for ``nl``/``nisa``
(``tests/nki_standin``) by placing it under the ``neuronxcc`` module names; the algorithm it must follow step by
step is ``nki_twin.py``. See docs/kernels.md for what each validation layer proves.

Launch grid ``[batch, heads]``; one program owns one (b, h) pair and walks the chunks of 128 steps in order,
carrying the state ``S[N, P]`` (state dim on the partitions) in SBUF. Kernel layouts (prepared in XLA by
``nki_backend.py``; conv, gating, projections, ``dt * x`` and ``dt * A`` stay outside):

    u   [b, H, L, P]  dt_t * x_t                 a   [b, H, L, 1]  dt_t * A_h  (<= 0)
    bm  [b, H, L, N]  B per head                 cm  [b, H, L, N]  C per head
    s0  [b, H, N, P]  initial state (transposed) tri [128, 128]    tri[k, i] = 1 if k <= i else 0
    dy  [b, H, L, P], ds [b, H, N, P]  (backward only) upstream gradients of y and of the final state

All arithmetic is fp32 (PSUM accumulation included). Limits: L % 128 == 0, P <= 128, N <= 128.
Per chunk with cs_i = a_0 + ... + a_i:
    y_i   = sum_{j<=i} exp(cs_i - cs_j) (C_i . B_j) u_j  +  exp(cs_i) C_i S_in
    S_out = exp(cs_last) S_in + sum_j exp(cs_last - cs_j) B_j^T u_j
"""

import neuronxcc.nki.isa as nisa
import neuronxcc.nki.language as nl
import numpy as np
from neuronxcc import nki

CHUNK = 128


def _decays(a_c, upper, ones):
    """Decay tiles of one chunk from its log-decays ``a_c`` [l, 1] (TensorE cumulative sums, no scan op).

    Returns (cs [l,1], lt [l,l] with lt[j,i] = exp(cs_i - cs_j) for j <= i else 0, e = exp(cs) [l,1],
    w = exp(cs_last - cs) [l,1], big = exp(cs_last) on every partition [l,1]).
    """
    cs = nisa.tensor_copy(nisa.nc_matmul(upper, a_c))  # cs[i] = sum_k upper[k, i] a[k]
    a_rows = nisa.tensor_scalar(ones, np.multiply, a_c)  # [k, j] = a[k]
    cs_rows = nisa.tensor_copy(nisa.nc_matmul(a_rows, upper))  # [j, i] = cs[i]
    seg = nisa.tensor_scalar(cs_rows, np.subtract, cs)  # [j, i] = cs[i] - cs[j]
    seg = nisa.tensor_tensor(seg, upper, np.multiply)  # 0 where j > i, so exp cannot overflow there
    lt = nisa.tensor_tensor(nisa.activation(nl.exp, seg), upper, np.multiply)
    last = nisa.tensor_copy(nisa.nc_matmul(ones, a_c))  # cs_last on every partition
    e = nisa.activation(nl.exp, cs)
    w = nisa.activation(nl.exp, nisa.tensor_tensor(last, cs, np.subtract))
    big = nisa.activation(nl.exp, last)
    return cs, lt, e, w, big


def _transpose(t):
    """SBUF [p, f] -> SBUF [f, p] through a TensorE transpose into PSUM (p, f <= 128)."""
    return nisa.tensor_copy(nisa.nc_transpose(t))


@nki.jit
def ssd_fwd_kernel(u, a, bm, cm, s0, tri):
    """Forward: returns (y [b, H, L, P] fp32, s_final [b, H, N, P] fp32); grid [b, H]."""
    nb, nh, seqlen, hd = u.shape
    ns = bm.shape[3]
    y = nl.ndarray((nb, nh, seqlen, hd), dtype=nl.float32, buffer=nl.shared_hbm)
    s_final = nl.ndarray((nb, nh, ns, hd), dtype=nl.float32, buffer=nl.shared_hbm)
    ib = nl.program_id(0)
    ih = nl.program_id(1)

    upper = nl.load(tri)
    ones = nl.ones((CHUNK, CHUNK), dtype=nl.float32, buffer=nl.sbuf)
    state = nl.ndarray((ns, hd), dtype=nl.float32, buffer=nl.sbuf)
    state[...] = nl.load(s0[ib, ih])

    for ic in nl.sequential_range(seqlen // CHUNK):
        rows = nl.ds(ic * CHUNK, CHUNK)
        u_c = nl.load(u[ib, ih, rows, :])
        a_c = nl.load(a[ib, ih, rows, :])
        b_c = nl.load(bm[ib, ih, rows, :])
        c_c = nl.load(cm[ib, ih, rows, :])
        _cs, lt, e, w, big = _decays(a_c, upper, ones)

        gt = nisa.tensor_copy(nisa.nc_matmul(_transpose(b_c), _transpose(c_c)))  # [j, i] = B_j . C_i
        wt = nisa.tensor_tensor(gt, lt, np.multiply)
        c_e = nisa.tensor_scalar(c_c, np.multiply, e)  # C_i exp(cs_i)
        y_ps = nl.zeros((CHUNK, hd), dtype=nl.float32, buffer=nl.psum)
        y_ps += nisa.nc_matmul(wt, u_c)  # intra-chunk (L o C B^T) u
        y_ps += nisa.nc_matmul(_transpose(c_e), state)  # carried-in state
        nl.store(y[ib, ih, rows, :], value=nisa.tensor_copy(y_ps))

        b_w = nisa.tensor_scalar(b_c, np.multiply, w)  # B_j exp(cs_last - cs_j)
        s_ps = nisa.nc_matmul(b_w, u_c)  # [N, P]
        state[...] = nisa.tensor_tensor(nisa.tensor_scalar(state, np.multiply, big[0:ns, :]), s_ps, np.add)

    nl.store(s_final[ib, ih], value=state)
    return y, s_final


@nki.jit
def ssd_bwd_kernel(u, a, bm, cm, s0, tri, dy, ds):
    """Backward: returns (du, da, db, dc, ds0) in the layouts of (u, a, bm, cm, s0), fp32; grid [b, H].

    Recomputes instead of storing: a forward pass over the chunks rebuilds each chunk's incoming state into SBUF,
    then a reverse pass carries dS and emits every gradient of one chunk at a time.
    """
    nb, nh, seqlen, hd = u.shape
    ns = bm.shape[3]
    nchunks = seqlen // CHUNK
    du = nl.ndarray((nb, nh, seqlen, hd), dtype=nl.float32, buffer=nl.shared_hbm)
    da = nl.ndarray((nb, nh, seqlen, 1), dtype=nl.float32, buffer=nl.shared_hbm)
    db = nl.ndarray((nb, nh, seqlen, ns), dtype=nl.float32, buffer=nl.shared_hbm)
    dc = nl.ndarray((nb, nh, seqlen, ns), dtype=nl.float32, buffer=nl.shared_hbm)
    ds0 = nl.ndarray((nb, nh, ns, hd), dtype=nl.float32, buffer=nl.shared_hbm)
    ib = nl.program_id(0)
    ih = nl.program_id(1)

    upper = nl.load(tri)
    lower = _transpose(upper)  # lower[i, k] = 1 if k <= i
    ones = nl.ones((CHUNK, CHUNK), dtype=nl.float32, buffer=nl.sbuf)
    states = nl.ndarray((ns, nchunks * hd), dtype=nl.float32, buffer=nl.sbuf)  # S_in of every chunk
    state = nl.ndarray((ns, hd), dtype=nl.float32, buffer=nl.sbuf)
    state[...] = nl.load(s0[ib, ih])

    for ic in nl.sequential_range(nchunks):  # pass 1: incoming states
        rows = nl.ds(ic * CHUNK, CHUNK)
        states[:, nl.ds(ic * hd, hd)] = nisa.tensor_copy(state)
        u_c = nl.load(u[ib, ih, rows, :])
        b_c = nl.load(bm[ib, ih, rows, :])
        _cs, _lt, _e, w, big = _decays(nl.load(a[ib, ih, rows, :]), upper, ones)
        s_ps = nisa.nc_matmul(nisa.tensor_scalar(b_c, np.multiply, w), u_c)
        state[...] = nisa.tensor_tensor(nisa.tensor_scalar(state, np.multiply, big[0:ns, :]), s_ps, np.add)

    dstate = nl.ndarray((ns, hd), dtype=nl.float32, buffer=nl.sbuf)
    dstate[...] = nl.load(ds[ib, ih])
    for ir in nl.sequential_range(nchunks):  # pass 2: reverse time
        ic = nchunks - 1 - ir
        rows = nl.ds(ic * CHUNK, CHUNK)
        _bwd_chunk(
            nl.load(u[ib, ih, rows, :]), nl.load(a[ib, ih, rows, :]), nl.load(bm[ib, ih, rows, :]),
            nl.load(cm[ib, ih, rows, :]), nl.load(dy[ib, ih, rows, :]), states[:, nl.ds(ic * hd, hd)],
            dstate, upper, lower, ones,
            (du[ib, ih, rows, :], da[ib, ih, rows, :], db[ib, ih, rows, :], dc[ib, ih, rows, :]),
        )
    nl.store(ds0[ib, ih], value=dstate)
    return du, da, db, dc, ds0


def _bwd_chunk(u_c, a_c, b_c, c_c, dy_c, s_in, dstate, upper, lower, ones, outs):
    """One chunk of the reverse pass: stores (du, da, db, dc) to the HBM slices ``outs`` and updates ``dstate``
    (dS at the chunk's end on entry, at its start on exit) in place. Same steps as ``nki_twin._bwd_chunk``;
    59 lines because every line is one engine instruction of a single dependency chain."""
    ns = b_c.shape[1]
    hd = u_c.shape[1]
    _cs, lt, e, w, big = _decays(a_c, upper, ones)
    gt = nisa.tensor_copy(nisa.nc_matmul(_transpose(b_c), _transpose(c_c)))  # [j, i] = B_j . C_i
    wt = nisa.tensor_tensor(gt, lt, np.multiply)
    c_e = nisa.tensor_scalar(c_c, np.multiply, e)
    b_w = nisa.tensor_scalar(b_c, np.multiply, w)
    u_t = _transpose(u_c)  # [P, l]
    dy_t = _transpose(dy_c)

    du_ps = nl.zeros((CHUNK, hd), dtype=nl.float32, buffer=nl.psum)
    du_ps += nisa.nc_matmul(_transpose(wt), dy_c)  # sum_i W[i, j] dy_i
    du_ps += nisa.nc_matmul(_transpose(b_w), dstate)  # sum_n Bw[j, n] dS[n, :]
    nl.store(outs[0], value=nisa.tensor_copy(du_ps))

    dwt = nisa.tensor_copy(nisa.nc_matmul(u_t, dy_t))  # [j, i] = u_j . dy_i
    dgt = nisa.tensor_tensor(dwt, lt, np.multiply)  # dG^T
    dmt = nisa.tensor_tensor(dwt, wt, np.multiply)  # dL^T o L^T

    d_ce = nisa.tensor_copy(nisa.nc_matmul(dy_t, _transpose(s_in)))  # [i, n] = dy_i . S_in[n, :]
    dc_ps = nl.zeros((CHUNK, ns), dtype=nl.float32, buffer=nl.psum)
    dc_ps += nisa.nc_matmul(dgt, b_c)  # sum_j dG[i, j] B_j
    nl.store(outs[3], value=nisa.tensor_tensor(dc_ps, nisa.tensor_scalar(d_ce, np.multiply, e), np.add))

    d_bw = nisa.tensor_copy(nisa.nc_matmul(u_t, _transpose(dstate)))  # [j, n] = u_j . dS[n, :]
    db_ps = nl.zeros((CHUNK, ns), dtype=nl.float32, buffer=nl.psum)
    db_ps += nisa.nc_matmul(_transpose(dgt), c_c)  # sum_i dG[i, j] C_i
    nl.store(outs[2], value=nisa.tensor_tensor(db_ps, nisa.tensor_scalar(d_bw, np.multiply, w), np.add))

    # d cs: through L (row sums minus column sums of dL o L), through exp(cs) and through exp(cs_last - cs).
    col = nisa.tensor_copy(nisa.nc_matmul(dmt, ones[:, 0:1]))  # [i] = sum_j dmt[j, i]
    row = nisa.tensor_reduce(np.add, dmt, axis=1, keepdims=True)  # [j] = sum_i dmt[j, i]
    de = nisa.tensor_tensor(nisa.tensor_reduce(np.add, nisa.tensor_tensor(d_ce, c_c, np.multiply), axis=1,
                                               keepdims=True), e, np.multiply)
    dw = nisa.tensor_tensor(nisa.tensor_reduce(np.add, nisa.tensor_tensor(d_bw, b_c, np.multiply), axis=1,
                                               keepdims=True), w, np.multiply)
    dcs = nisa.tensor_tensor(nisa.tensor_tensor(col, row, np.subtract), nisa.tensor_tensor(de, dw, np.subtract),
                             np.add)
    d_big = nisa.tensor_tensor(nisa.tensor_reduce(np.add, nisa.tensor_tensor(dstate, s_in, np.multiply), axis=1,
                                                  keepdims=True), big[0:ns, :], np.multiply)
    da_ps = nl.zeros((CHUNK, 1), dtype=nl.float32, buffer=nl.psum)
    da_ps += nisa.nc_matmul(lower, dcs)  # reverse cumulative sum: da[k] = sum_{i >= k} dcs[i]
    da_ps += nisa.nc_matmul(ones, dw)  # cs_last depends on every a[k]
    da_ps += nisa.nc_matmul(ones[0:ns, :], d_big)
    nl.store(outs[1], value=nisa.tensor_copy(da_ps))

    ds_ps = nisa.nc_matmul(c_e, dy_c)  # [n, p] = sum_i C_i e_i dy_i
    dstate[...] = nisa.tensor_tensor(nisa.tensor_scalar(dstate, np.multiply, big[0:ns, :]), ds_ps, np.add)
