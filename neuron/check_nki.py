#!/usr/bin/env python
"""Checks of bmojo's NKI kernels that only a trn1 instance can finish (docs/kernels.md, neuron/README.md).

    python neuron/check_nki.py budget [sizes]   # anywhere: TensorE FLOPs, HBM bytes and a roofline lower bound,
                                                # counted by running the kernel source on the NumPy stand-in
    python neuron/check_nki.py kernel [sizes] [--simulate]
                                                # trn1: the kernels through nki.baremetal (or simulate_kernel)
                                                # against the torch twin, every output
    python neuron/check_nki.py op [sizes] --device xla --dtype bf16
                                                # trn1: the nki backend against the chunked path inside torch-xla
                                                # (outputs, all input gradients) and the time of each;
                                                # bf16 = x, B, C in bf16 (the kernels compute in fp32)

    python neuron/check_nki.py attn-kernel [sizes] [--simulate]   # the attention kernels, as ``kernel``
    python neuron/check_nki.py attn-op [sizes] --device xla --dtype bf16   # the attention op, as ``op``

sizes: --batch 1 --heads 8 --length 2048 --head-dim 64 --state 128 --window 512 --memory 128 (the ladder
presets' shapes; the attention checks use --head-dim as the attention head dim, kv heads = heads / 2).
``op --device cpu`` with ``BMOJO_NKI_STANDIN=1`` runs the same comparison with the twin in the kernels' place.
Exit status 1 where an error exceeds its tolerance.
"""

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "src"), os.path.join(ROOT, "tests")]

# trn1 NeuronCore-v2 (docs/kernels.md sources): fp32 TensorE peak, and one core's share of the device's HBM.
TENSOR_E_FP32 = 23e12
HBM_PER_CORE = 820e9 / 2
TOL = {"fp32": 1e-4, "bf16": 3e-2}


def inputs(args, dtype=None):
    import torch

    from bmojo.ops.ssd.nki_backend import to_kernel_layout

    g = torch.Generator().manual_seed(0)
    b, h, L, P, N = args.batch, args.heads, args.length, args.head_dim, args.state
    raw = dict(x=torch.randn(b, L, h, P, generator=g), dt=0.005 + 0.2 * torch.rand(b, L, h, generator=g),
               A=-torch.logspace(-1.7, 0.6, h), B=torch.randn(b, L, 1, N, generator=g),
               C=torch.randn(b, L, 1, N, generator=g), D=torch.randn(h, generator=g),
               initial_state=torch.randn(b, h, P, N, generator=g))
    kernel = [t.detach() for t in to_kernel_layout(raw["x"], raw["dt"], raw["A"], raw["B"], raw["C"],
                                                   raw["initial_state"])]
    return raw, kernel


def rel(got, want):
    got, want = got.detach(), want.detach()
    return float((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30))


def budget(args):
    import nki_standin
    import numpy as np
    import torch

    import bmojo.ops.ssd as pkg
    from bmojo.ops.ssd.nki_twin import triangle

    one = argparse.Namespace(**{**vars(args), "batch": 1, "heads": 1})
    _, k = inputs(one)
    module = nki_standin.load_kernel_module(os.path.join(os.path.dirname(pkg.__file__), "nki.py"))
    arrays = [t.float().numpy() for t in k] + [triangle().numpy()]
    for name, kernel, extra in (("forward", module.ssd_fwd_kernel, []),
                                ("backward", module.ssd_bwd_kernel,
                                 [np.ones_like(arrays[0]), np.ones_like(arrays[4])])):
        nki_standin.BUDGET.matmul_flops = nki_standin.BUDGET.hbm_bytes = 0
        nki_standin.simulate_kernel(kernel[1, 1], *arrays, *extra)
        programs = args.batch * args.heads
        flops, nbytes = nki_standin.BUDGET.matmul_flops * programs, nki_standin.BUDGET.hbm_bytes * programs
        bound = max(flops / TENSOR_E_FP32, nbytes / HBM_PER_CORE)
        print(f"{name}: {flops / 1e9:.3f} GFLOP on TensorE (fp32), {nbytes / 1e6:.2f} MB HBM traffic; roofline "
              f"lower bound on one NeuronCore {bound * 1e6:.1f} us (VectorE/ScalarE work not counted)")
    del torch
    return 0


def kernel(args):
    import torch
    from neuronxcc import nki as real_nki

    import bmojo.ops.ssd.nki as kernels
    from bmojo.ops.ssd.nki_twin import ssd_twin_bwd, ssd_twin_fwd, triangle

    _, k = inputs(args)
    k = [t.float() for t in k]
    y, s = ssd_twin_fwd(*k)
    g = torch.Generator().manual_seed(1)
    dy, ds = torch.randn(y.shape, generator=g), torch.randn(s.shape, generator=g)
    want = (y, s, *ssd_twin_bwd(*k, dy, ds))
    arrays = [t.numpy() for t in k] + [triangle().numpy()]
    grid = (args.batch, args.heads)
    if args.simulate:
        run = lambda fn, *a: real_nki.simulate_kernel(fn[grid], *a)
    else:
        run = lambda fn, *a: real_nki.baremetal(fn)[grid](*a)
    got = (*run(kernels.ssd_fwd_kernel, *arrays), *run(kernels.ssd_bwd_kernel, *arrays, dy.numpy(), ds.numpy()))
    return report(zip(("y", "state", "du", "da", "db", "dc", "ds0"), got, want), TOL["fp32"], torch)


def op(args):
    import torch

    from bmojo.ops.ssd import ssd_chunked, ssd_nki
    from bmojo.ops.ssd.nki_backend import supports_nki

    device, sync = _device(args)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    raw, _ = inputs(args)
    names = list(raw)

    def run(fn, cast):
        t = {n: v.to(device=device, dtype=cast if n in ("x", "B", "C") else torch.float32).requires_grad_()
             for n, v in raw.items()}
        y, s = fn(**t, chunk_size=128)
        grads = torch.autograd.grad(y.float().sum() + s.sum(), [t[n] for n in names])
        return [y, s, *grads]

    probe = {n: v.to(device=device, dtype=dtype if n in ("x", "B", "C") else torch.float32) for n, v in raw.items()}
    verdict = supports_nki(**probe, chunk_size=128)
    if verdict is not True:
        print(f"check_nki: the nki backend refuses these inputs: {verdict}")
        return 1
    return timed(args, run, ssd_chunked, ssd_nki, dtype, sync, ["y", "state", *(f"d{n}" for n in names)], torch)


def attention_inputs(args, device="cpu", dtype=None):
    import torch

    from bmojo.ops.selection.common import INVALID_SCORE, EideticMemory

    g = torch.Generator().manual_seed(0)
    b, h, L, D, M = args.batch, args.heads, args.length, args.head_dim, args.memory
    hkv, nc = max(1, h // 2), L // 128
    t = {n: torch.randn(b, L, h if n in ("q", "q_eid") else hkv, D, generator=g)
         for n in ("q", "k", "v", "k_fade", "v_fade", "q_eid")}
    score = torch.rand(b, nc, M, generator=g)
    score[:, :, ::4] = INVALID_SCORE
    mem = [torch.randn(b, nc, M, hkv, D, generator=g) for _ in range(2)]
    pos = torch.randint(0, L, (b, nc, M), generator=g)
    t = {n: x.to(device=device, dtype=dtype or torch.float32).requires_grad_() for n, x in t.items()}
    mem = [x.to(device=device, dtype=dtype or torch.float32).requires_grad_() for x in mem]
    return t, mem, EideticMemory(mem[0], mem[1], pos.to(device), score.to(device))


def attn_kernel(args):
    import torch
    from neuronxcc import nki as real_nki

    import bmojo.ops.attention.nki as kernels
    from bmojo.ops.attention.nki_twin import attention_twin_bwd, attention_twin_fwd, kernel_arrays, kernel_inputs

    t, _, memory = attention_inputs(args)
    static, kt = kernel_inputs(t["q"], t["k"], t["v"], args.window, 128, t["k_fade"], t["v_fade"], t["q_eid"],
                               memory)
    o, lse = attention_twin_fwd({**static, **kt})
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(1))
    grads = attention_twin_bwd({**static, **kt}, o, lse, do)
    arrays = [x.numpy() for x in kernel_arrays(static, kt)]
    grid = (args.batch, args.heads)
    if args.simulate:
        run = lambda fn, *a: real_nki.simulate_kernel(fn[grid], *a)  # noqa: E731
    else:
        run = lambda fn, *a: real_nki.baremetal(fn)[grid](*a)  # noqa: E731
    o_k, lse_k = run(kernels.attn_fwd_kernel, *arrays)
    got = run(kernels.attn_bwd_kernel, *arrays, o.detach().numpy(), lse.detach()[..., None].numpy(), do.numpy())
    names = ("q", "qe", "kw", "vw", "kf", "vf", "mk", "mv")
    want = [grads[n].flatten(2, 3) if n in ("mk", "mv") else grads[n] for n in names]
    rows = [("o", o_k, o), ("lse", lse_k[..., 0], lse), *zip((f"d{n}" for n in names), got, want)]
    return report(rows, TOL["fp32"], torch)


def attn_op(args):
    import torch

    from bmojo.ops.attention import bmojo_attention_chunked, bmojo_attention_nki, supports_attention_nki

    device, sync = _device(args)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32

    def run(fn, cast):
        t, mem, memory = attention_inputs(args, device, cast)
        out = fn(t["q"], t["k"], t["v"], args.window, 128, t["k_fade"], t["v_fade"], t["q_eid"], memory)
        return [out, *torch.autograd.grad(out.float().sum(), [*t.values(), *mem])]

    t, _, memory = attention_inputs(args, device, dtype)
    verdict = supports_attention_nki(t["q"], t["k"], t["v"], args.window, 128, t["k_fade"], t["v_fade"],
                                     t["q_eid"], memory)
    if verdict is not True:
        print(f"check_nki: the nki backend refuses these inputs: {verdict}")
        return 1
    names = ["out", "dq", "dk", "dv", "dk_fade", "dv_fade", "dq_eid", "dmemory.k", "dmemory.v"]
    return timed(args, run, bmojo_attention_chunked, bmojo_attention_nki, dtype, sync, names, torch)


def _device(args):
    import torch

    if args.device == "xla":
        import torch_xla

        return torch_xla.device(), torch_xla.sync
    return torch.device("cpu"), (lambda: None)


def timed(args, run, chunked, nki_fn, dtype, sync, names, torch):
    """Reference = the chunked form in fp32; then both forms in ``dtype``, timed side by side."""
    want = [x.detach().float().cpu() for x in run(chunked, torch.float32)]
    sync()
    times, got = {}, None
    for label, fn in (("chunked", chunked), ("nki", nki_fn)):
        out = run(fn, dtype)  # warm-up (compiles on XLA)
        sync()
        start = time.perf_counter()
        for _ in range(args.repeat):
            out = run(fn, dtype)
            sync()
        times[label] = (time.perf_counter() - start) / args.repeat
        if label == "nki":
            got = [x.detach().float().cpu() for x in out]
    sizes = ", ".join(f"{k} {v}" for k, v in vars(args).items() if k not in ("check", "simulate", "repeat"))
    print(f"forward+backward per call: chunked {times['chunked'] * 1e3:.2f} ms, nki {times['nki'] * 1e3:.2f} ms "
          f"({sizes})")
    return report(zip(names, got, want), TOL[args.dtype], torch)


def report(rows, tol, torch):
    worst = 0.0
    for name, got, want in rows:
        err = rel(torch.as_tensor(got), torch.as_tensor(want))
        worst = max(worst, err)
        print(f"  {name}: max|err|/max|ref| = {err:.2e}")
    print(f"check_nki: {'OK' if worst <= tol else 'FAILED'} (worst {worst:.2e}, tolerance {tol:.0e})")
    return 0 if worst <= tol else 1


def main(argv=None):
    parser = argparse.ArgumentParser(prog="check_nki.py", description=__doc__.split("\n")[0])
    parser.add_argument("check", choices=("budget", "kernel", "op", "attn-kernel", "attn-op"))
    for flag, default in (("--batch", 1), ("--heads", 8), ("--length", 2048), ("--head-dim", 64), ("--state", 128),
                          ("--window", 512), ("--memory", 128), ("--repeat", 5)):
        parser.add_argument(flag, type=int, default=default)
    parser.add_argument("--device", choices=("xla", "cpu"), default="xla")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--simulate", action="store_true", help="kernel: neuronxcc simulate_kernel, not hardware")
    args = parser.parse_args(argv)
    checks = {"budget": budget, "kernel": kernel, "op": op, "attn-kernel": attn_kernel, "attn-op": attn_op}
    return checks[args.check](args)


if __name__ == "__main__":
    sys.exit(main())
