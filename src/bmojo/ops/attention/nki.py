"""Joint B'MOJO attention, forward and backward, as Beta-1 NKI kernels for trn1 (``neuronxcc.nki``, Neuron SDK 2.28).

Importing this module imports ``neuronxcc``: only ``nki_backend.py`` does so, and only when the ``nki`` backend
runs on a Neuron device (docs/kernels.md). The CPU tests run this source through the NumPy stand-in
(``tests/nki_standin``) against the algorithm twin ``nki_twin.attention_twin_fwd`` / ``attention_twin_bwd``.

Grid ``[batch, heads]``; each program walks its 128-query tiles. Per tile, one online softmax (running ``m, l, o``
in SBUF) over the ``(W+C)/C`` window key tiles, the as many fading key tiles and the one eidetic tile; it emits
``o`` and ``lse``. HBM inputs (built in XLA by ``nki_twin.kernel_arrays``; all masks are additive, 0 or -30000):

    q, qe     [b, H, L, D]       queries for window/fading and for the eidetic keys, pre-scaled
    kw, vw    [b, H, W+L, D]     keys/values padded by W in front: tile t of chunk c is block c+t
    kf, vf    [b, H, 2W+L, D]    fading keys/values padded by 2W in front: the same block rule
    mk, mv    [b, H, nC*M, D]    the memory each chunk sees, M <= 128 rows per chunk
    band_w, band_f [T, C, C]     static band masks per tile offset;  kb_w [1, W+L], kb_f [1, 2W+L] key biases
    ebias     [b, L, M]          eidetic validity and visibility per query

Limits: C = 128, L and W multiples of 128, D <= 128, M <= 128, no key padding mask.
"""

import numpy as np
import neuronxcc.nki as nki
import neuronxcc.nki.isa as nisa
import neuronxcc.nki.language as nl

CHUNK = 128
NEG = -30000.0


def _transpose(t):
    return nisa.tensor_copy(nisa.nc_transpose(t))


def _online_step(q_t, k_t, v_c, bias, m, l, o_acc):
    """Fold one key tile into the running softmax (in place): q_t [D, C], k_t [D, K], v_c [K, D], bias [C, K]."""
    s = nisa.tensor_tensor(nisa.nc_matmul(q_t, k_t), bias, np.add)  # [C, K] scores
    m_new = nisa.tensor_tensor(m, nisa.tensor_reduce(np.max, s, axis=1, keepdims=True), np.maximum)
    neg_m = nisa.tensor_scalar(m_new, np.multiply, -1.0)
    p = nisa.activation(nl.exp, s, bias=neg_m)  # exp(s - m_new)
    alpha = nisa.activation(nl.exp, m, bias=neg_m)  # exp(m - m_new)
    l[...] = nisa.tensor_tensor(
        nisa.tensor_tensor(l, alpha, np.multiply), nisa.tensor_reduce(np.add, p, axis=1, keepdims=True), np.add
    )
    pv = nisa.nc_matmul(_transpose(p), v_c)  # [C, D]
    o_acc[...] = nisa.tensor_tensor(nisa.tensor_scalar(o_acc, np.multiply, alpha), pv, np.add)
    m[...] = m_new


def _band_tiles(q_t, keys, vals, band, kbias, ib, ih, ic, ones_row, m, l, o_acc):
    """The (W+C)/C key tiles of one key set for query tile ``ic``."""
    for it in nl.static_range(band.shape[0]):
        blk = nl.ds((ic + it) * CHUNK, CHUNK)
        key_bias = nisa.nc_matmul(ones_row, nl.load(kbias[0:1, blk]))  # [C, C]: the key bias on every query
        bias = nisa.tensor_tensor(nl.load(band[it]), key_bias, np.add)
        k_t = _transpose(nl.load(keys[ib, ih, blk, :]))
        _online_step(q_t, k_t, nl.load(vals[ib, ih, blk, :]), bias, m, l, o_acc)


@nki.jit
def attn_fwd_kernel(q, qe, kw, vw, kf, vf, mk, mv, band_w, band_f, kb_w, kb_f, ebias):
    """Returns (o [b, H, L, D] fp32, lse [b, H, L, 1] fp32); grid [b, H]."""
    nb, nh, seqlen, hd = q.shape
    nchunks = seqlen // CHUNK
    mem = mk.shape[2] // nchunks
    o = nl.ndarray((nb, nh, seqlen, hd), dtype=nl.float32, buffer=nl.shared_hbm)
    lse = nl.ndarray((nb, nh, seqlen, 1), dtype=nl.float32, buffer=nl.shared_hbm)
    ib = nl.program_id(0)
    ih = nl.program_id(1)
    ones_row = nl.ones((1, CHUNK), dtype=nl.float32, buffer=nl.sbuf)

    for ic in nl.affine_range(nchunks):
        rows = nl.ds(ic * CHUNK, CHUNK)
        m = nl.full((CHUNK, 1), NEG, dtype=nl.float32, buffer=nl.sbuf)
        l = nl.zeros((CHUNK, 1), dtype=nl.float32, buffer=nl.sbuf)
        o_acc = nl.zeros((CHUNK, hd), dtype=nl.float32, buffer=nl.sbuf)
        q_t = _transpose(nl.load(q[ib, ih, rows, :]))  # [D, C]
        _band_tiles(q_t, kw, vw, band_w, kb_w, ib, ih, ic, ones_row, m, l, o_acc)
        _band_tiles(q_t, kf, vf, band_f, kb_f, ib, ih, ic, ones_row, m, l, o_acc)
        slots = nl.ds(ic * mem, mem)
        _online_step(
            _transpose(nl.load(qe[ib, ih, rows, :])),
            _transpose(nl.load(mk[ib, ih, slots, :])),
            nl.load(mv[ib, ih, slots, :]),
            nl.load(ebias[ib, rows, :]),
            m,
            l,
            o_acc,
        )
        nl.store(o[ib, ih, rows, :], value=nisa.tensor_scalar(o_acc, np.divide, l))
        nl.store(lse[ib, ih, rows, :], value=nisa.tensor_tensor(m, nisa.activation(nl.log, l), np.add))
    return o, lse


def _probs_grad(q_t, k_t, v_t, do_t, bias, neg_lse, delta):
    """Recompute p = exp(s - lse) for one key tile and ds = p o (dO V^T - rowsum(dO o O)); both [C, K]."""
    s = nisa.tensor_tensor(nisa.nc_matmul(q_t, k_t), bias, np.add)
    p = nisa.activation(nl.exp, s, bias=neg_lse)
    dp = nisa.nc_matmul(do_t, v_t)
    return p, nisa.tensor_tensor(p, nisa.tensor_scalar(dp, np.subtract, delta), np.multiply)


def _query_side(q, o, lse, do, ib, ih, ic):
    """Per query tile: (q [C,D], q^T, dO [C,D], dO^T, -lse [C,1], rowsum(dO o O) [C,1])."""
    rows = nl.ds(ic * CHUNK, CHUNK)
    q_c = nl.load(q[ib, ih, rows, :])
    do_c = nl.load(do[ib, ih, rows, :])
    neg_lse = nisa.tensor_scalar(nl.load(lse[ib, ih, rows, :]), np.multiply, -1.0)
    delta = nisa.tensor_reduce(
        np.add, nisa.tensor_tensor(nl.load(o[ib, ih, rows, :]), do_c, np.multiply), axis=1, keepdims=True
    )
    return q_c, _transpose(q_c), do_c, _transpose(do_c), neg_lse, delta


def _band_bias(band, kbias, it, kb, ones_row):
    key_bias = nisa.nc_matmul(ones_row, nl.load(kbias[0:1, nl.ds(kb * CHUNK, CHUNK)]))
    return nisa.tensor_tensor(nl.load(band[it]), key_bias, np.add)


# Long on purpose: an NKI kernel is one traced function; its two passes are marked inside.
@nki.jit
def attn_bwd_kernel(q, qe, kw, vw, kf, vf, mk, mv, band_w, band_f, kb_w, kb_f, ebias, o, lse, do):
    """Gradients (dq, dqe, dkw, dvw, dkf, dvf, dmk, dmv) in the layouts of the inputs, fp32; grid [b, H].

    Pass 1, query tiles outer: dq (window and fading tiles), dqe, dK_mem, dV_mem. Pass 2, key blocks outer, so each
    block's dK, dV accumulate in PSUM and are stored once (no HBM read-modify-write): for block kb, the query tiles
    kb - t for t < T. Pass 2 is unrolled (``static_range``) because a block's valid query tiles are a condition on
    the loop index; its trace grows with (W + L) / C * T.
    """
    nb, nh, seqlen, hd = q.shape
    nchunks = seqlen // CHUNK
    mem = mk.shape[2] // nchunks
    ntiles = band_w.shape[0]
    dq = nl.ndarray((nb, nh, seqlen, hd), dtype=nl.float32, buffer=nl.shared_hbm)
    dqe = nl.ndarray((nb, nh, seqlen, hd), dtype=nl.float32, buffer=nl.shared_hbm)
    grads = {}
    for name, ref in (("kw", kw), ("vw", vw), ("kf", kf), ("vf", vf), ("mk", mk), ("mv", mv)):
        grads[name] = nl.ndarray(ref.shape, dtype=nl.float32, buffer=nl.shared_hbm)
    ib = nl.program_id(0)
    ih = nl.program_id(1)
    ones_row = nl.ones((1, CHUNK), dtype=nl.float32, buffer=nl.sbuf)

    for ic in nl.affine_range(nchunks):  # pass 1
        q_c, q_t, do_c, do_t, neg_lse, delta = _query_side(q, o, lse, do, ib, ih, ic)
        dq_ps = nl.zeros((CHUNK, hd), dtype=nl.float32, buffer=nl.psum)
        for keys, vals, band, kbias in ((kw, vw, band_w, kb_w), (kf, vf, band_f, kb_f)):
            for it in nl.static_range(ntiles):
                blk = nl.ds((ic + it) * CHUNK, CHUNK)
                k_c = nl.load(keys[ib, ih, blk, :])
                _, ds = _probs_grad(
                    q_t,
                    _transpose(k_c),
                    _transpose(nl.load(vals[ib, ih, blk, :])),
                    do_t,
                    _band_bias(band, kbias, it, ic + it, ones_row),
                    neg_lse,
                    delta,
                )
                dq_ps += nisa.nc_matmul(_transpose(ds), k_c)
        nl.store(dq[ib, ih, nl.ds(ic * CHUNK, CHUNK), :], value=nisa.tensor_copy(dq_ps))
        rows, slots = nl.ds(ic * CHUNK, CHUNK), nl.ds(ic * mem, mem)
        qe_c = nl.load(qe[ib, ih, rows, :])
        mk_c = nl.load(mk[ib, ih, slots, :])
        p, ds = _probs_grad(
            _transpose(qe_c),
            _transpose(mk_c),
            _transpose(nl.load(mv[ib, ih, slots, :])),
            do_t,
            nl.load(ebias[ib, rows, :]),
            neg_lse,
            delta,
        )
        nl.store(dqe[ib, ih, rows, :], value=nisa.tensor_copy(nisa.nc_matmul(_transpose(ds), mk_c)))
        nl.store(grads["mk"][ib, ih, slots, :], value=nisa.tensor_copy(nisa.nc_matmul(ds, qe_c)))
        nl.store(grads["mv"][ib, ih, slots, :], value=nisa.tensor_copy(nisa.nc_matmul(p, do_c)))

    for name, keys, vals, band, kbias in (("w", kw, vw, band_w, kb_w), ("f", kf, vf, band_f, kb_f)):  # pass 2
        for kb in nl.static_range(keys.shape[2] // CHUNK):
            blk = nl.ds(kb * CHUNK, CHUNK)
            k_t = _transpose(nl.load(keys[ib, ih, blk, :]))
            v_t = _transpose(nl.load(vals[ib, ih, blk, :]))
            dk_ps = nl.zeros((CHUNK, hd), dtype=nl.float32, buffer=nl.psum)
            dv_ps = nl.zeros((CHUNK, hd), dtype=nl.float32, buffer=nl.psum)
            for it in nl.static_range(ntiles):
                ic = kb - it
                if 0 <= ic < nchunks:
                    q_c, q_t, do_c, do_t, neg_lse, delta = _query_side(q, o, lse, do, ib, ih, ic)
                    p, ds = _probs_grad(q_t, k_t, v_t, do_t, _band_bias(band, kbias, it, kb, ones_row), neg_lse, delta)
                    dk_ps += nisa.nc_matmul(ds, q_c)
                    dv_ps += nisa.nc_matmul(p, do_c)
            nl.store(grads["k" + name][ib, ih, blk, :], value=nisa.tensor_copy(dk_ps))
            nl.store(grads["v" + name][ib, ih, blk, :], value=nisa.tensor_copy(dv_ps))
    return dq, dqe, grads["kw"], grads["vw"], grads["kf"], grads["vf"], grads["mk"], grads["mv"]
