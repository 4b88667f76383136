"""Memory per NeuronCore of training a preset with tensor parallelism (and ZeRO-1) on trn1, against 16 GiB of HBM:

    python -m bmojo.parallel.memory [--presets 130m 370m 790m 1.4b] [--seq-len 2048 8192] [--cores 32]

What each rank holds (``--bf16`` autocast keeps float32 parameters, as ``bmojo train`` does):

* weights: 4 bytes x the rank's parameters (replicated ones whole, sharded ones / tp; ``plan.parameter_rules``);
* gradients: 4 bytes x the same;
* AdamW state: 8 bytes x the same (two float32 moments), divided by the data-parallel size ``cores / tp`` with
  ZeRO-1;
* activations of one sequence: MEASURED, not modelled. The tensors autograd saves for the backward
  (``torch.autograd.graph.saved_tensors_hooks``, parameters excluded) in a bf16 forward of the rank's shard of the
  model (``shard_model`` with a collective-free stand-in backend: each rank's forward saves the same tensors as in
  the real run; the all-reduced sums are not saved), on the CPU, for 1 and 2 layers at 256 and 512 tokens; the
  total is fitted as ``(a + b * L) + layers * (c + d * L)`` (linear in the length ``L``: the SSM and the sliding
  window attention are). Compiler temporaries and the runtime's own share of HBM are not included: keep headroom.

Nothing here needs a Neuron device; nothing here has been checked against a Neuron device's memory report.
"""

from __future__ import annotations

import argparse
import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..configuration_bmojo import BMojoConfig
from ..modeling_bmojo import BMojoForCausalLM
from ..presets import PRESETS
from .backends import ColumnParallelLinear
from .plan import check_tp_size, parameter_rules
from .tensor_parallel import shard_model

GiB = 2**30
HBM_PER_CORE = 16 * GiB


def rank_parameters(config: BMojoConfig, tp: int) -> int:
    """Parameters one rank of ``tp`` holds (tied embeddings counted once)."""
    rules = parameter_rules(config)
    with torch.device("meta"):
        model = BMojoForCausalLM(config)
    return sum(p.numel() // (tp if name in rules else 1) for name, p in model.named_parameters())


class _RowNoSum(nn.Module):
    def __init__(self, weight, bias):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias) if bias is not None else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class _MeasuringBackend:
    """``shard_model``'s backend interface without collectives: a rank's shapes, for counting its activations."""

    name = "measure"

    def __init__(self, tp: int):
        self.tp = tp

    def rank_and_size(self):
        return 0, self.tp

    def column_linear(self, weight, bias, in_features, out_features):
        return ColumnParallelLinear(weight, bias, None)  # identity forward (the backward all-reduce never runs)

    def row_linear(self, weight, bias, in_features, out_features):
        return _RowNoSum(weight, bias)

    def sum_over_shards(self, x):
        return x

    def copy_to_shards(self, x):
        return x


def saved_activation_bytes(config: BMojoConfig, tp: int, seq_len: int) -> int:
    """Bytes autograd saves in a bf16 forward (with loss) of one sequence on one rank of ``tp`` (CPU, measured)."""
    torch.manual_seed(0)
    model = BMojoForCausalLM(config).to(torch.bfloat16)
    shard_model(model, 0, tp, backend=_MeasuringBackend(tp))
    params = {id(p) for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        if id(t) not in params and not isinstance(t, nn.Parameter):
            seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    x = torch.randint(0, config.vocab_size, (1, seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), contextlib.suppress(StopIteration):
        model(input_ids=x, labels=x)
    return sum(seen.values())


def activation_model(preset: dict, tp: int, lengths=(256, 512)) -> tuple[float, float, float, float]:
    """``(a, b, c, d)``: activations ~ ``(a + b L) + layers (c + d L)`` bytes for one sequence, from 1- and 2-layer
    models of the preset's width (measured at ``lengths``)."""
    values = {}
    for layers in (1, 2):
        config = BMojoConfig(**{**preset, "num_hidden_layers": layers})
        for length in lengths:
            values[layers, length] = saved_activation_bytes(config, tp, length)
    (l0, l1) = lengths
    per_layer = {n: values[2, n] - values[1, n] for n in lengths}
    rest = {n: values[1, n] - per_layer[n] for n in lengths}
    d = (per_layer[l1] - per_layer[l0]) / (l1 - l0)
    b = (rest[l1] - rest[l0]) / (l1 - l0)
    return rest[l0] - b * l0, b, per_layer[l0] - d * l0, d


def table(presets, seq_lens, cores: int = 32, degrees=(1, 2, 4, 8)) -> list[dict]:
    """One row per (preset, tp, sequence length): GiB per NeuronCore of each part, with and without ZeRO-1. Degrees
    whose weights, gradients and ZeRO-1 state alone exceed the HBM are left out."""
    rows = []
    for name in presets:
        config = BMojoConfig(**PRESETS[name])
        for tp in degrees:
            try:
                check_tp_size(config, tp)
            except ValueError:
                continue
            params = rank_parameters(config, tp)
            dp = cores // tp
            if 8 * params + 8 * params / dp > HBM_PER_CORE:  # no room left: not worth measuring (1.4b at tp 1)
                continue
            a, b, c, d = activation_model(PRESETS[name], tp)
            for seq_len in seq_lens:
                act = a + b * seq_len + config.num_hidden_layers * (c + d * seq_len)
                weights, grads, adam = 4 * params, 4 * params, 8 * params
                rows.append(
                    dict(preset=name, tp=tp, dp=dp, seq_len=seq_len, params=params, weights=weights / GiB,
                         grads=grads / GiB, adamw=adam / GiB, adamw_zero1=adam / dp / GiB, activations=act / GiB,
                         total=(weights + grads + adam + act) / GiB,
                         total_zero1=(weights + grads + adam / dp + act) / GiB)  # fmt: skip
                )
    return rows


def markdown(rows: list[dict]) -> str:
    head = (
        "| preset | tp x dp | seq len | params / rank | weights | grads | AdamW | AdamW ZeRO-1 | activations / seq "
        "| total | total ZeRO-1 | sequences per core in 16 GiB (ZeRO-1) |"
    )
    lines = [head, "|---" * 12 + "|"]
    for r in rows:
        free = HBM_PER_CORE / GiB - (r["total_zero1"] - r["activations"])
        fits = max(0, int(free // r["activations"]))
        lines.append(
            f"| {r['preset']} | {r['tp']} x {r['dp']} | {r['seq_len']} | {r['params'] / 1e6:.0f}M | "
            f"{r['weights']:.2f} | {r['grads']:.2f} | {r['adamw']:.2f} | {r['adamw_zero1']:.2f} | "
            f"{r['activations']:.2f} | {r['total']:.2f} | {r['total_zero1']:.2f} | {fits} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bmojo.parallel.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["130m", "370m", "790m", "1.4b"], choices=list(PRESETS))
    parser.add_argument("--seq-len", nargs="+", type=int, default=[2048, 8192])
    parser.add_argument("--cores", type=int, default=32, help="NeuronCores per node (trn1.32xlarge: 32)")
    parser.add_argument("--tp", nargs="+", type=int, default=[1, 2, 4, 8])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"GiB per NeuronCore (16 GiB HBM each), {args.cores} cores; activations of ONE sequence, bf16, measured")
    print(markdown(table(args.presets, args.seq_len, args.cores, tuple(args.tp))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
