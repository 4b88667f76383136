"""On paper: FLOPs, HBM bytes and roofline time of one training step on trn1, per op, per preset.

    python -m bmojo.roofline [--preset NAME ...] [--seq-len L] [--batch B] [--dtype bf16|fp32]
                             [--kernel-dtype bf16|fp32] [--options defaults|v0|v0+FIELD] [--summary] [--json]

Nothing here runs on Trainium or measures anything: it counts what this package's chunked ops compute
(``ops/ssd/chunk.py``, ``ops/attention/chunk.py``, ``ops/selection/chunk.py``, the layers) for a config, and divides
by trn1's peak rates (the Neuron SDK's architecture guide,
``nki/guides/architecture/trainium_inferentia2_arch.rst``). docs/roofline.md has
the tables and what they mean; tests/test_roofline.py ties the FLOP counts to the code with torch's FLOP counter.
It prices the options the config holds: the presets with the issue-11 defaults (the self fading key, the key-set
biases, the learned selection bias, window-exit admission, eidetic keys at distance 0), ``--options v0``, the
original design (``V0_OPTIONS``), or ``--options v0+FIELD``, v0 with one of those fields at its default.

Conventions (each one is a choice; the docs repeat them):

* **FLOPs** are matmul FLOPs, ``2*m*n*k`` per product, and the depthwise convolution's ``2 * outputs * K``, as
  ``torch.utils.flop_counter`` counts them. The backward counts one product per operand that needs a gradient:
  ``2x`` the forward for a linear layer, ``1x`` for a product with a constant (the ones matrices of the SSD's prefix
  sums, the innovation predictor's detached input), none for a product of constants (the closed-form memory's
  ranking; selection moves rows by gathers, no FLOPs). The attention backward is
  autograd's through the chunked op's matmuls (the scores are saved, not recomputed): ``8 D`` per score against
  ``4 D`` forward, ``D`` the head width (a flash-style backward, as the NKI kernel's, recomputes ``Q K^T`` once
  more: ``+2 D``). Elementwise work is not a FLOP here.
* **HBM bytes** are the minimum of a fused op: every input and output of the op read or written once per pass
  (forward; backward), activations at the step's dtype (2 bytes bf16, 4 fp32), parameters, their gradients and the
  optimizer state at 4 bytes (bf16 autocast keeps float32 weights, as ``bmojo train --bf16`` does). Intermediates
  that a fused kernel keeps on chip (the SSD's ``[l x l]`` decay tiles, the attention scores, the chunk states) are
  not counted; the chunked PyTorch form materialises them, ``intermediate_bytes`` says how big one such set is.
* **Time per op** on one NeuronCore-v2: ``roofline = max(FLOPs / TensorE peak, bytes / HBM bandwidth)``; TensorE
  92 TFLOPS bf16, 23 fp32; HBM 820 GB/s per device of two cores, so 410 GB/s per core when both train (data
  parallel). Two more lower bounds, from the same source: ScalarE evaluates ``exp``/``silu``/``softplus`` at one
  element per lane per cycle (128 lanes, 1.4 GHz), VectorE one elementwise op (or one fused multiply-add) per lane
  per cycle (128 lanes, 1.12 GHz); only the large element counts are modelled (exps of the scores and decays,
  activations, the conv's multiply-adds, softmax/mask passes, the SSD recurrence, the selection's comparisons).
  ``time = max(all four)``: the engines overlap within an op, ops run one after another, and a step is the sum.
* The SSD and attention matmuls run in the step's dtype: under bf16 autocast torch casts their ``bmm`` operands to
  bf16 although the ops compute in float32 otherwise (checked in tests/test_roofline.py). ``--kernel-dtype fp32``
  prices them at TensorE's fp32 rate instead, as the NKI kernels (all-fp32 arithmetic) are written.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field

from .presets import PRESETS

# --------------------------------------------------------------------------------------------------------------------
# The machine
# --------------------------------------------------------------------------------------------------------------------
DTYPE_BYTES = {"bf16": 2, "fp32": 4}
PARAM_BYTES = 4  # float32 weights, gradients and AdamW moments (bf16 autocast keeps float32 parameters)


@dataclass(frozen=True)
class Machine:
    """Peak rates of one NeuronCore-v2 (trn1), from the Neuron SDK's architecture guide (see the module docstring)."""

    name: str = "trn1 NeuronCore-v2"
    tensor_flops: tuple[tuple[str, float], ...] = (("bf16", 92e12), ("fp32", 23e12))
    hbm_bytes_per_s: float = 820e9 / 2  # 820 GB/s per device of two cores, both training
    scalar_elems_per_s: float = 128 * 1.4e9  # ScalarE: 128 lanes at 1.4 GHz
    vector_elems_per_s: float = 128 * 1.12e9  # VectorE: 128 lanes at 1.12 GHz

    def peak(self, dtype: str) -> float:
        return dict(self.tensor_flops)[dtype]


TRN1 = Machine()

# The sequence length each preset trains at: the ladder at 2,048 (neuron/train_trn1_32xlarge.sh, the memory table in
# neuron/README.md), the CPU presets at bmojo train's default (settings.TrainConfig.seq_len).
TRAINING_SEQ_LEN = {"tiny": 64, "cpu": 256, "130m": 2048, "370m": 2048, "790m": 2048, "1.4b": 2048}
DEFAULT_PRESETS = ("cpu", "130m", "370m", "790m", "1.4b")

GROUPS = ("embeddings", "projections", "conv", "ssd", "attention", "selection", "mlp", "norms", "optimizer")


# --------------------------------------------------------------------------------------------------------------------
# Counting
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class Cost:
    """One pass (forward or backward) of an op: matmul ``flops``, HBM ``bytes``, ScalarE activation evaluations
    ``act`` and VectorE element operations ``vec``."""

    flops: float = 0.0
    bytes: float = 0.0
    act: float = 0.0
    vec: float = 0.0

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.flops + other.flops, self.bytes + other.bytes, self.act + other.act, self.vec + other.vec)

    def __mul__(self, k: float) -> Cost:
        return Cost(self.flops * k, self.bytes * k, self.act * k, self.vec * k)


@dataclass
class Op:
    """An op of the step summed over the layers: forward and backward costs, the dtype its matmuls run in, and a
    breakdown of its FLOPs (forward + backward) by part."""

    name: str
    group: str
    fwd: Cost
    bwd: Cost
    dtype: str
    parts: dict[str, float] = field(default_factory=dict)
    intermediate_bytes: float = 0.0

    @property
    def total(self) -> Cost:
        return self.fwd + self.bwd

    def merge(self, other: Op) -> None:
        self.fwd, self.bwd = self.fwd + other.fwd, self.bwd + other.bwd
        for k, v in other.parts.items():
            self.parts[k] = self.parts.get(k, 0.0) + v
        self.intermediate_bytes += other.intermediate_bytes


def linear(tokens: int, n_in: int, n_out: int, s: int, input_grad: bool = True) -> tuple[Cost, Cost]:
    """``y = x W^T`` over ``tokens`` rows: forward and backward cost (``input_grad=False``: the input is detached,
    the backward computes only the weight's gradient)."""
    flops = 2.0 * tokens * n_in * n_out
    weight = n_in * n_out * PARAM_BYTES
    fwd = Cost(flops, tokens * n_in * s + weight + tokens * n_out * s)
    # backward reads dy and x and writes dW; with an input gradient it also reads W and writes dx.
    bwd = Cost(flops, tokens * n_out * s + tokens * n_in * s + weight)
    if input_grad:
        bwd = bwd + Cost(flops, weight + tokens * n_in * s)
    return fwd, bwd


def ssd_op(batch: int, length: int, heads: int, head_dim: int, groups: int, state: int, chunk: int, s: int) -> Op:
    """The chunked SSD scan (``ssd_chunked``) as it computes: per chunk of ``l`` steps and head, the prefix sum
    ``a @ triu(ones)`` (``2 l^2``), the segment sums ``tril(ones) @ m`` (``2 l^3``: the masked prefix sum of
    ``segsum``), ``C B^T`` per group (``2 l^2 N``), the intra-chunk output (``2 l^2 P``), the chunk's own state
    (``2 l P N``), the carried-in state's output (``2 l N P``), and the recurrence over chunks (elementwise)."""
    n_chunks = -(-length // chunk)
    rows = batch * n_chunks  # (batch, chunk) pairs
    l, H, P, G, N = chunk, heads, head_dim, groups, state
    fwd_parts = {
        "decay (prefix sums)": 2.0 * rows * H * l * l + 2.0 * rows * H * l**3,
        "intra-chunk (CB, scores x)": 2.0 * rows * G * l * l * N + 2.0 * rows * H * l * l * P,
        "chunk states": 2.0 * rows * H * P * l * N,
        "inter-chunk recurrence": 0.0,
        "state outputs (C S_in)": 2.0 * rows * H * l * N * P,
    }
    # Products with a constant (the ones matrices) have one gradient; the rest two. With one chunk the carried-in
    # state is the (constant) zero state and the chunk's own state feeds only the final state, which training
    # does not use: neither product has a backward through the state.
    bwd_factor = {"decay (prefix sums)": 1.0}
    if n_chunks == 1:
        bwd_factor.update({"chunk states": 0.0, "state outputs (C S_in)": 1.0})
    parts = {k: v * (1.0 + bwd_factor.get(k, 2.0)) for k, v in fwd_parts.items()}
    tokens = batch * length
    inputs = tokens * (H * P + H + 2 * G * N) * s  # x, dt, B, C (A, D: a few numbers per head)
    output = tokens * H * P * s
    tile = rows * H * l * l  # entries of one [l x l] tile per head and chunk
    exps = rows * H * (l * l + l + 1)  # exp(segsum), exp(prefix), the chunk decay
    recurrence = rows * H * P * N  # S = decay * S + new, one fused multiply-add per entry
    fwd = Cost(sum(fwd_parts.values()), inputs + output, exps, 3 * tile + recurrence)  # mask, * CB, * dt
    # The backward reads the inputs and dy, writes their gradients, recomputes the decays (as the NKI kernel does).
    bwd_flops = sum(v * bwd_factor.get(k, 2.0) for k, v in fwd_parts.items())
    bwd = Cost(bwd_flops, 2 * inputs + output, exps, 6 * tile + 2 * recurrence)
    return Op("SSD chunked scan", "ssd", fwd, bwd, "", parts, intermediate_bytes=tile * 4)


def attention_op(
    batch: int,
    length: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    window: int,
    chunk: int,
    fading: bool,
    memory: int,
    s: int,
    *,
    self_key: bool = False,
    key_set_bias: bool = False,
    slot_bias: bool = False,
) -> Op:
    """The chunked B'MOJO attention (``bmojo_attention_chunked``, one softmax per chunk): each chunk of ``C`` queries
    scores ``C x (2 (W+C) + M)`` keys (window, fading, eidetic), and ``C`` more with the self fading key
    (``self_key``: the chunk's own ``C`` fading tokens under a diagonal mask, of which each query keeps one); the
    rotated queries score the window, fading and self keys and the eidetic queries the memory slots, every score a
    ``D``-wide dot product. A full window without fading, self key or memory is one causal SDPA call over ``L x L``
    (torch counts the whole square).

    Logit biases are no FLOPs: ``key_set_bias`` (one per query head on the fading, self and eidetic keys) and
    ``slot_bias`` (``learned_selection``: each memory slot's ``u``) add one VectorE op per biased score forward and
    one per score and bias backward (their gradient is ``dS`` summed over the scores they cover); they read the
    biases (float32) and write their gradients."""
    n_chunks = -(-length // chunk)
    padded = n_chunks * chunk
    window = min(window, padded)  # the op clamps it
    tokens = batch * length
    D = head_dim
    if not fading and not self_key and not memory and window >= padded:
        sets = {"causal (full window)": batch * heads * length * length}
    else:
        per_chunk = batch * n_chunks * heads * chunk  # query rows
        sets = {"window": per_chunk * (window + chunk)}
        if fading:
            sets["fading"] = per_chunk * (window + chunk)
        if self_key:
            sets["self fading"] = per_chunk * chunk
        if memory:
            sets["eidetic"] = per_chunk * memory
    scores = sum(sets.values())
    parts = {name: 3 * 4.0 * n * D for name, n in sets.items()}  # backward: 2x the forward
    q = tokens * heads * D * s * (2 if memory else 1)  # q_rot (and q_eid)
    kv = tokens * kv_heads * D * s * (2 + (2 if fading else 0) + (2 if self_key else 0))  # k, v (fading, self)
    mem = 2 * batch * n_chunks * memory * kv_heads * D * s  # the memory each chunk sees
    # The key sets with a per-head bias, and the scores each bias covers (the slot bias: the eidetic ones).
    head_biased = [name for name in ("fading", "self fading", "eidetic") if key_set_bias and name in sets]
    slot_biased = sets.get("eidetic", 0) if slot_bias else 0
    biased = sum(sets[name] for name in head_biased)
    added = biased + (0 if "eidetic" in head_biased else slot_biased)  # scores that get one (summed) bias add
    bias_bytes = 4 * heads * len(head_biased) + (4 * batch * n_chunks * memory if slot_biased else 0)
    out = tokens * heads * D * s
    lse = tokens * heads * 4
    inputs = q + kv + mem + bias_bytes
    # exp; mask, row max (+ the bias add)
    fwd = Cost(4.0 * scores * D, inputs + out + lse, scores, 2 * scores + added)
    # backward: dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q; reads the inputs, o, do and lse, writes every
    # input's gradient. A fused kernel recomputes p = exp(s - lse) rather than reading P: counted on ScalarE.
    bwd = Cost(8.0 * scores * D, 2 * inputs + 2 * out + lse, scores,
               4 * scores + biased + slot_biased)
    return Op("attention (window + fading + eidetic)", "attention", fwd, bwd, "", parts, scores * 4)


def selection_op(
    batch: int,
    length: int,
    features: int,
    chunk: int,
    picks: int,
    capacity: int,
    s: int,
    *,
    bias: bool = False,
    delay: int = 0,
) -> Op:
    """Eidetic selection (``select_per_chunk``): ``picks`` rounds of argmax per chunk, the picked rows taken by a
    fixed-shape gather, and the memory: up to ``CLOSED_FORM_MAX_PICKS`` picks the closed form, which ranks the
    ``P = nC k`` picks for every chunk by one matmul (``2 P^2 (nC + 1)``, on constants: no backward) and fetches
    the slots by indexing; beyond, one merge per chunk that ranks the ``M + k`` entries by pairwise comparison and
    moves them by a gather. Gathers and their backward (a scatter-add into the moved rows) are no FLOPs here.

    ``bias`` (``learned_selection``): the ranking scores are ``score * exp(u)`` (an exp and a product per token)
    and every pick and slot carries its ``u`` (float32): read per token, written per slot, and the gradient back.
    ``delay`` (``memory_admission="window_exit"``: ``W / C`` chunks): picks join ``delay`` chunks later; the closed
    form ranks the same picks (its pool mask differs), the scan merges ``nC - delay`` times instead of ``nC``."""
    n_chunks = -(-length // chunk)
    tokens = batch * length
    n = capacity + picks
    seen = 2 * batch * n_chunks * capacity * (features * s + 12)  # k, v (+ pos int64, score fp32)
    kv = 2 * tokens * features * s
    argmax = picks * tokens * 3
    count = n_chunks * picks
    u = tokens * 4 + batch * n_chunks * capacity * 4 if bias else 0  # u per token in, per slot out (float32)
    u_vec, u_exp = (tokens, tokens) if bias else (0, 0)  # score * exp(u)
    if count <= 2048:  # ops/selection/chunk.py CLOSED_FORM_MAX_PICKS: the closed form, ranks by one matmul
        compare = batch * n_chunks * (6 * n * n) + argmax  # pairwise ranking; argmax rounds
        rank = 2.0 * batch * count * count * (n_chunks + 1)
        parts = {"take picks (gather)": 0.0, "rank picks (closed form)": rank}
        fwd = Cost(rank, tokens * 4 + kv + seen + u, u_exp, batch * count * count * 4 + compare + u_vec)
        bwd = Cost(0.0, seen + kv + u, 0.0, 0.0)
        return Op("eidetic selection + memory", "selection", fwd, bwd, "", parts)
    compare = batch * max(n_chunks - delay, 0) * (6 * n * n) + argmax  # one pairwise merge per admission
    parts = {"take picks (gather)": 0.0, "merge into memory (gather)": 0.0}
    fwd = Cost(0.0, tokens * 4 + kv + seen + u, u_exp, compare + u_vec)
    bwd = Cost(0.0, seen + kv + u, 0.0, 0.0)
    return Op("eidetic selection + merge", "selection", fwd, bwd, "", parts)


# --------------------------------------------------------------------------------------------------------------------
# One training step of a config
# --------------------------------------------------------------------------------------------------------------------
def parameter_count(config) -> int:
    """Parameters of ``BMojoForCausalLM(config)`` (tied embeddings once), built on the meta device."""
    import torch

    from .modeling_bmojo import BMojoForCausalLM

    with torch.device("meta"):
        model = BMojoForCausalLM(config)
    return sum(p.numel() for p in model.parameters())


def step_ops(config, seq_len: int, batch: int = 1, dtype: str = "bf16", kernel_dtype: str | None = None) -> list[Op]:
    """The ops of one training step (forward + backward + AdamW) of ``config`` on ``batch`` sequences of
    ``seq_len`` tokens, each summed over the layers, in step order. ``kernel_dtype``: the dtype the SSD and
    attention matmuls run in (default ``dtype``). Counts the options ``config`` holds (the issue-11 fields, the
    selection score); ``ValueError`` for ``memory_per_kv_head``, which it does not price."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
    kernel_dtype = kernel_dtype or dtype
    if config.memory_per_kv_head and config.eidetic and "bmojo" in config.layers_block_type:
        raise ValueError("memory_per_kv_head is not priced: step_ops counts one memory per layer")
    if kernel_dtype not in DTYPE_BYTES:
        raise ValueError(f"kernel_dtype must be one of {sorted(DTYPE_BYTES)}, got {kernel_dtype!r}")
    s = DTYPE_BYTES[dtype]
    c = config
    T = batch * seq_len
    d, H, Hkv, D = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    ops: dict[str, Op] = {}

    def add(op: Op) -> None:
        op.dtype = op.dtype or dtype
        if op.name in ops:
            ops[op.name].merge(op)
        else:
            ops[op.name] = op

    def linears(name: str, group: str, shapes, input_grad: bool = True) -> Op:
        fwd, bwd = Cost(), Cost()
        for n_in, n_out in shapes:
            f, b = linear(T, n_in, n_out, s, input_grad)
            fwd, bwd = fwd + f, bwd + b
        return Op(name, group, fwd, bwd, dtype)

    def norm(width: int) -> Op:  # RMSNorm: read x, write y; backward reads dy and x, writes dx
        return Op("norms, rotary, residuals, gating", "norms", Cost(0, 2 * T * width * s, 0, 3 * T * width),
                  Cost(0, 3 * T * width * s, 0, 6 * T * width), dtype)

    def elementwise(elements: float, act: float = 0.0) -> Op:  # read and write `elements` per pass
        return Op("norms, rotary, residuals, gating", "norms", Cost(0, 2 * elements * s, act, 3 * elements),
                  Cost(0, 2 * elements * s, act, 3 * elements), dtype)

    # Embedding: gather T rows; the backward writes the dense table gradient.
    add(Op("embedding", "embeddings", Cost(0, T * d * (PARAM_BYTES + s)),
           Cost(0, T * d * s + c.vocab_size * d * PARAM_BYTES), dtype))

    for layer_type in c.layers_block_type:
        add(norm(d))
        attends = layer_type in ("attention", "bmojo")
        has_ssm = c.layer_has_ssm(layer_type)
        bmojo = layer_type == "bmojo"
        fading = bmojo and c.use_fading
        self_key = bmojo and c.fading_self_key  # query i also scores its own fading token f_i
        eidetic = bmojo and c.eidetic
        learned = eidetic and c.learned_selection
        if attends:
            shapes = [(d, H * D), (d, Hkv * D), (d, Hkv * D), (H * D, d)]
            if fading or self_key:
                shapes += [(d, Hkv * D), (d, Hkv * D)]  # the fading tokens through the same k/v weights
            add(linears("attention projections q/k/v/o (+ fading k/v)", "projections", shapes))
            # rotary on q, k, the fading keys (window and self share them) and, at eidetic_key_distance="window",
            # the eidetic queries (rotated by 2W; "zero" scores the unrotated q)
            rotated = H * D + Hkv * D + (Hkv * D if fading or self_key else 0)
            rotated += H * D if eidetic and c.eidetic_key_distance == "window" else 0
            add(elementwise(T * rotated))
        if has_ssm:
            inner, heads, groups, N = c.ssm_inner_size, c.ssm_num_heads, c.ssm_ngroups, c.ssm_state_size
            conv_dim = inner + 2 * groups * N
            add(linears("SSM projections in/out", "projections", [(d, inner + conv_dim + heads), (inner, d)]))
            K = c.ssm_conv_kernel
            add(Op("causal conv + SiLU", "conv",
                   Cost(2.0 * T * conv_dim * K, 2 * T * conv_dim * s, T * conv_dim, T * conv_dim * K),
                   Cost(4.0 * T * conv_dim * K, 3 * T * conv_dim * s, T * conv_dim, 2 * T * conv_dim * K), dtype))
            ssd_chunk = getattr(c, "ssd_chunk_size", None) or c.chunk_size
            add(ssd_op(batch, seq_len, heads, c.ssm_head_dim, groups, N, ssd_chunk, s))
            # gated RMSNorm: reads y and z, writes the output (silu of z on ScalarE); backward writes dy and dz.
            add(Op("norms, rotary, residuals, gating", "norms", Cost(0, 3 * T * inner * s, T * inner, 4 * T * inner),
                   Cost(0, 5 * T * inner * s, T * inner, 8 * T * inner), dtype))
        if eidetic:
            F = Hkv * D
            target = {"key_prediction": F, "next_input": d}.get(c.selection_score)  # what the predictor predicts
            if target:  # the baselines ("random", "recency") hold no predictor
                predictor = linears("eidetic innovation predictor", "selection", [(d, target)], input_grad=False)
                # its squared error against the (detached) target: read it, write the score; backward reads both.
                predictor.fwd = predictor.fwd + Cost(0, T * target * s + T * 4, 0, 2 * T * target)
                predictor.bwd = predictor.bwd + Cost(0, T * target * s + T * 4, 0, 2 * T * target)
                add(predictor)
            if learned:  # u = clamp(Linear(d, 1)(h)): trained through the kept tokens' eidetic logits
                bias = linears("learned selection bias u", "selection", [(d, 1)])
                bias.fwd = bias.fwd + Cost(0, 0, 0, T)  # the clamp
                bias.bwd = bias.bwd + Cost(0, 0, 0, T)
                add(bias)
            delay = c.window_size // c.chunk_size if c.memory_admission == "window_exit" else 0
            add(selection_op(batch, seq_len, F, c.chunk_size, c.selections_per_chunk, c.memory_size, s,
                             bias=learned, delay=delay))
        if attends:
            memory = c.memory_size if eidetic else 0
            add(attention_op(batch, seq_len, H, Hkv, D, c.window_size, c.chunk_size, fading, memory, s,
                             self_key=self_key, key_set_bias=bmojo and c.key_set_bias, slot_bias=learned))
        add(elementwise(T * d))  # the mixer's residual add
        if c.use_mlp:
            add(norm(d))
            inter = c.intermediate_size
            mlp = linears("MLP (SwiGLU)", "mlp", [(d, inter), (d, inter), (inter, d)])
            mlp.fwd = mlp.fwd + Cost(0, 3 * T * inter * s, T * inter, T * inter)  # silu(g) * u
            mlp.bwd = mlp.bwd + Cost(0, 5 * T * inter * s, T * inter, 3 * T * inter)
            add(mlp)
            add(elementwise(T * d))  # the MLP's residual add

    add(norm(d))  # final norm
    head = linears("LM head + cross-entropy", "embeddings", [(d, c.vocab_size)])
    logits = T * c.vocab_size
    head.fwd = head.fwd + Cost(0, logits * s, logits, 3 * logits)  # the loss reads the logits: max, exp, sum
    head.bwd = head.bwd + Cost(0, logits * s, logits, 2 * logits)  # and writes their gradient
    add(head)

    n_params = parameter_count(c)
    # AdamW: read parameter, gradient, two moments; write parameter and moments (float32); a sqrt per parameter.
    add(Op("optimizer step (AdamW)", "optimizer", Cost(0, 7 * PARAM_BYTES * n_params, n_params, 10 * n_params),
           Cost(), dtype))
    for name in ("SSD chunked scan", "attention (window + fading + eidetic)"):
        if name in ops:
            ops[name].dtype = kernel_dtype
    return list(ops.values())


# --------------------------------------------------------------------------------------------------------------------
# Time
# --------------------------------------------------------------------------------------------------------------------
def op_times(op: Op, machine: Machine = TRN1) -> dict:
    """Seconds of ``op`` (forward + backward) on one core: per engine, the roofline ``max(TensorE, HBM)``, the
    bound over all four engines and which one binds."""
    t = op.total
    times = {
        "tensor": t.flops / machine.peak(op.dtype),
        "hbm": t.bytes / machine.hbm_bytes_per_s,
        "scalar": t.act / machine.scalar_elems_per_s,
        "vector": t.vec / machine.vector_elems_per_s,
    }
    roofline = max(times["tensor"], times["hbm"])
    bound = max(times, key=times.get)
    return {
        **times,
        "roofline": roofline,
        "roofline_bound": "compute" if times["tensor"] >= times["hbm"] else "memory",
        "time": times[bound],
        "bound": {"tensor": "compute", "hbm": "memory", "scalar": "ScalarE", "vector": "VectorE"}[bound],
    }


# The fields whose default differs from V0_OPTIONS (issue 11); "v0+NAME" prices v0 with NAME at its default.
ISSUE_11_FIELDS = ("fading_self_key", "key_set_bias", "learned_selection", "eidetic_key_distance", "memory_admission")
OPTIONS = ("defaults", "v0", *(f"v0+{name}" for name in ISSUE_11_FIELDS))


def options_config(preset: str, options: str = "defaults"):
    """``preset``'s config with ``options``: as it is (``"defaults"``), with ``V0_OPTIONS`` (``"v0"``, the original
    design), or v0 with one issue-11 field at its default (``"v0+fading_self_key"``, ...)."""
    from .configuration_bmojo import V0_OPTIONS, preset_config

    if options not in OPTIONS:
        raise ValueError(f"options must be one of {list(OPTIONS)}, got {options!r}")
    if options == "defaults":
        return preset_config(preset)
    overrides = dict(V0_OPTIONS)
    for name in options.split("+")[1:]:
        del overrides[name]  # the preset's (default) value
    return preset_config(preset, **overrides)


def report(preset: str, seq_len: int | None = None, batch: int = 1, dtype: str = "bf16",
           kernel_dtype: str | None = None, machine: Machine = TRN1, options: str = "defaults") -> dict:
    """Everything the CLI prints for one preset, as plain data (the ``--json`` output); ``options``: see
    ``options_config``."""
    config = options_config(preset, options)
    seq_len = seq_len or TRAINING_SEQ_LEN[preset]
    ops = step_ops(config, seq_len, batch, dtype, kernel_dtype)
    rows = []
    for op in ops:
        rows.append({
            "op": op.name,
            "group": op.group,
            "dtype": op.dtype,
            "flops_fwd": op.fwd.flops,
            "flops_bwd": op.bwd.flops,
            "bytes_fwd": op.fwd.bytes,
            "bytes_bwd": op.bwd.bytes,
            "scalar_elems": op.total.act,
            "vector_elems": op.total.vec,
            "flops_parts": op.parts,
            "intermediate_bytes": op.intermediate_bytes,
            **op_times(op, machine),
        })
    step_roofline = sum(r["roofline"] for r in rows)
    step_time = sum(r["time"] for r in rows)
    tokens = batch * seq_len

    def share(group: str, key: str, total: float) -> float:
        return sum(r[key] for r in rows if r["group"] == group) / total

    optimizer = sum(r["roofline"] for r in rows if r["group"] == "optimizer")
    n_params = parameter_count(config)
    total_flops = sum(r["flops_fwd"] + r["flops_bwd"] for r in rows)
    mixing = sum(r["flops_fwd"] + r["flops_bwd"] for r in rows if r["group"] in ("ssd", "attention"))
    return {
        "preset": preset,
        "options": options,
        "seq_len": seq_len,
        "batch": batch,
        "dtype": dtype,
        "kernel_dtype": kernel_dtype or dtype,
        "machine": machine.name,
        "parameters": n_params,
        "tokens": tokens,
        "layers": config.num_hidden_layers,
        "ops": rows,
        "flops": total_flops,
        "bytes": sum(r["bytes_fwd"] + r["bytes_bwd"] for r in rows),
        "step_roofline_s": step_roofline,
        "step_time_s": step_time,
        "tokens_per_s_roofline": tokens / step_roofline,
        "tokens_per_s": tokens / step_time,
        "ssd_fraction_roofline": share("ssd", "roofline", step_roofline),
        "attention_fraction_roofline": share("attention", "roofline", step_roofline),
        "ssd_fraction": share("ssd", "time", step_time),
        "attention_fraction": share("attention", "time", step_time),
        "ssd_fraction_fwd_bwd": share("ssd", "roofline", step_roofline - optimizer),
        "attention_fraction_fwd_bwd": share("attention", "roofline", step_roofline - optimizer),
        # The rule of thumb: 6 x parameters x tokens, plus what the sequence mixing adds.
        "six_nt_plus_mixing": 6.0 * n_params * tokens + mixing,
    }


# --------------------------------------------------------------------------------------------------------------------
# Printing
# --------------------------------------------------------------------------------------------------------------------
def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}" if seconds < 0.01 else f"{seconds * 1e3:.1f}"


def markdown(rep: dict) -> str:
    """One preset's table (markdown) and its summary lines."""
    lines = [
        f"**{rep['preset']}**{'' if rep['options'] == 'defaults' else ' (' + rep['options'] + ')'} "
        f"({rep['parameters'] / 1e6:.1f}M parameters), "
        f"{rep['batch']} x {rep['seq_len']} tokens per step per core, {rep['dtype']} "
        f"(SSD/attention matmuls {rep['kernel_dtype']})",
        "",
        "| op | GFLOP | MB | TensorE ms | HBM ms | roofline ms | bound | % of step | ScalarE ms | VectorE ms "
        "| with engines ms | bound | % |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---|---:|",
    ]
    roof, step = rep["step_roofline_s"], rep["step_time_s"]
    for r in rep["ops"]:
        lines.append(
            f"| {r['op']} | {(r['flops_fwd'] + r['flops_bwd']) / 1e9:,.1f} | "
            f"{(r['bytes_fwd'] + r['bytes_bwd']) / 1e6:,.1f} | {_ms(r['tensor'])} | {_ms(r['hbm'])} | "
            f"{_ms(r['roofline'])} | {r['roofline_bound']} | {100 * r['roofline'] / roof:.1f} | "
            f"{_ms(r['scalar'])} | {_ms(r['vector'])} | {_ms(r['time'])} | {r['bound']} | "
            f"{100 * r['time'] / step:.1f} |"
        )
    lines += [
        f"| **step** | {rep['flops'] / 1e9:,.1f} | {rep['bytes'] / 1e6:,.1f} | | | **{_ms(roof)}** | | 100 | | | "
        f"**{_ms(step)}** | | 100 |",
        "",
        f"Step {_ms(roof)} ms at the roofline ({rep['tokens_per_s_roofline']:,.0f} tokens/s per core); "
        f"SSD scan **{100 * rep['ssd_fraction_roofline']:.1f}%**, attention "
        f"**{100 * rep['attention_fraction_roofline']:.1f}%** of it ({100 * rep['ssd_fraction_fwd_bwd']:.1f}% and "
        f"{100 * rep['attention_fraction_fwd_bwd']:.1f}% of forward + backward). With the ScalarE/VectorE bounds "
        f"{_ms(step)} ms ({rep['tokens_per_s']:,.0f} tokens/s): SSD {100 * rep['ssd_fraction']:.1f}%, attention "
        f"{100 * rep['attention_fraction']:.1f}%. FLOPs / (6 N T + SSD + attention FLOPs) = "
        f"{rep['flops'] / rep['six_nt_plus_mixing']:.3f}.",
    ]
    layers = rep["layers"]
    budget = []
    for group, label in (("ssd", "SSD"), ("attention", "attention")):
        group_rows = [r for r in rep["ops"] if r["group"] == group]
        if group_rows:
            roof_us = sum(r["roofline"] for r in group_rows) / layers * 1e6 / rep["batch"]
            time_us = sum(r["time"] for r in group_rows) / layers * 1e6 / rep["batch"]
            budget.append(f"{label} {roof_us:,.0f} us ({time_us:,.0f} us with ScalarE/VectorE)")
    if budget:
        lines.append(f"Per layer and sequence, forward + backward, at this bound: {'; '.join(budget)}.")
    for r in rep["ops"]:
        if r["group"] in ("ssd", "attention") and r["flops_parts"]:
            total = r["flops_fwd"] + r["flops_bwd"]
            shares = ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in r["flops_parts"].items() if v)
            lines.append(f"{r['op']} FLOPs: {shares}.")
    return "\n".join(lines)


def summary(reports: list[dict]) -> str:
    """One row per preset: the step at the roofline and the shares of the SSD scan and the attention."""
    lines = [
        "| preset | params | tokens/step | GFLOP | GB | step ms (roofline) | tokens/s/core | SSD % | attention % "
        "| step ms (engines) | SSD % | attention % |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in reports:
        name = r["preset"] + ("" if r["options"] == "defaults" else f" ({r['options']})")
        lines.append(
            f"| {name} | {r['parameters'] / 1e6:,.1f}M | {r['batch']} x {r['seq_len']} "
            f"| {r['flops'] / 1e9:,.0f} | {r['bytes'] / 1e9:,.2f} | {_ms(r['step_roofline_s'])} "
            f"| {r['tokens_per_s_roofline']:,.0f} "
            f"| {100 * r['ssd_fraction_roofline']:.1f} | {100 * r['attention_fraction_roofline']:.1f} "
            f"| {_ms(r['step_time_s'])} | {100 * r['ssd_fraction']:.1f} | {100 * r['attention_fraction']:.1f} |"
        )
    return "\n".join(lines)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bmojo.roofline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", nargs="+", choices=sorted(PRESETS), default=list(DEFAULT_PRESETS),
                        help="presets to count (default: cpu and the ladder)")
    parser.add_argument("--seq-len", type=_positive,
                        help="tokens per sequence (default: each preset's training length)")
    parser.add_argument("--batch", type=_positive, default=1, help="sequences per step per NeuronCore (default 1)")
    parser.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="bf16", help="the step's dtype")
    parser.add_argument("--kernel-dtype", choices=sorted(DTYPE_BYTES),
                        help="dtype of the SSD and attention matmuls (default: --dtype; fp32 = the NKI kernels)")
    parser.add_argument("--options", choices=OPTIONS, default="defaults", metavar="{defaults,v0,v0+FIELD}",
                        help="the presets' design options: defaults (issue 11), v0 (the original design, V0_OPTIONS), "
                        f"or v0 with one field at its default, FIELD one of {', '.join(ISSUE_11_FIELDS)}")
    parser.add_argument("--summary", action="store_true", help="one row per preset instead of the tables")
    parser.add_argument("--json", action="store_true", help="print the counts as JSON")
    args = parser.parse_args(argv)
    reports = [report(p, args.seq_len, args.batch, args.dtype, args.kernel_dtype, options=args.options)
               for p in args.preset]
    if args.json:
        print(json.dumps(reports, indent=1))
    elif args.summary:
        print(summary(reports))
    else:
        print("\n\n".join(markdown(r) for r in reports))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = [
    "TRN1", "Cost", "Machine", "Op", "attention_op", "main", "options_config", "report", "selection_op", "ssd_op",
    "step_ops",
]
