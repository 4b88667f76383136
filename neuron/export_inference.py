#!/usr/bin/env python3
"""Export a trained bmojo model as two fixed-shape Neuron graphs (``torch_neuronx.trace``) for trn1 inference.

    python neuron/export_inference.py --model runs/370m --batch-size 1 --prompt-length 128 --out exported/370m

writes into ``--out``:

* ``prefill.pt``: ``input_ids [B, P] -> (logits [B, V] of the last position, positions [B], *state)``;
* ``decode.pt``:  ``(token [B], positions [B], *state) -> (logits [B, V], positions [B], *state)``;
* ``initial_state.safetensors``: the empty state (position 0), for prompts shorter than ``P``;
* ``manifest.json``: shapes, dtypes and the order of the state tensors (see ``bmojo.trn1.inference_graphs``).

Both graphs are TorchScript modules (``torch.jit.load`` them after ``import torch_neuronx``);
``bmojo.trn1.inference_graphs.NeuronBMojoGenerator.load(DIR)`` runs them for greedy decoding. After saving, the
graphs are loaded back and their logits compared with the eager model on the CPU (prefill and ``--check-steps``
decode steps).

Order of work: arguments are checked first (exit 2), then the environment (exit 3, one line per missing piece,
before anything imports torch_neuronx), and only then is the model loaded and traced.

``--cpu-trace`` is the CPU stand-in: the same wrappers traced with ``torch.jit.trace`` (the TorchScript tracer
that ``torch_neuronx.trace`` also produces its module for), no Neuron packages needed, no Neuron graph produced.
``--dry-run`` prints the manifest without tracing. Neither checks the Neuron environment.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import runpy
import shlex
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

# The environment checker (bmojo.trn1.environment, standard library only), run by its path in this checkout as
# neuron/check_env.py does: the check must report before anything imports torch or the bmojo package, which may be
# missing here.
check_env = SimpleNamespace(
    **runpy.run_path(str(Path(__file__).resolve().parents[1] / "src" / "bmojo" / "trn1" / "environment.py"))
)

PROG = "export_inference.py"
DEFAULT_COMPILER_ARGS = "--model-type=transformer --auto-cast=none"
OUTPUT_FILES = ("manifest.json", "prefill.pt", "decode.pt", "initial_state.safetensors")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        self.exit(2, f"{PROG}: error: {message} (see {PROG} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Export prefill and decode graphs of a bmojo model with torch_neuronx.trace.")
    p.add_argument(
        "--model",
        required=True,
        metavar="DIR",
        help="a save_pretrained directory, a checkpoint "
        "directory (model.safetensors + config.json) or a run directory (its newest checkpoint)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write the graphs and manifest into")
    p.add_argument("--batch-size", type=_positive_int, default=1, help="rows per call, fixed in the graphs (default 1)")
    p.add_argument(
        "--prompt-length",
        type=_positive_int,
        default=128,
        help="tokens the prefill graph takes per row, fixed (default 128)",
    )
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="model dtype (default float32)")
    p.add_argument(
        "--compiler-args",
        default=DEFAULT_COMPILER_ARGS,
        help=f"neuronx-cc arguments, one string (default: {DEFAULT_COMPILER_ARGS!r})",
    )
    p.add_argument(
        "--compiler-workdir", metavar="DIR", help="neuronx-cc work directory (default: OUT/compiler_workdir)"
    )
    p.add_argument(
        "--check-steps",
        type=int,
        default=8,
        help="decode steps compared with the eager CPU model after export (default 8; 0 skips the check)",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        help="largest accepted |logits difference| in that comparison (default 1e-3 for float32, 0.1 for bfloat16)",
    )
    p.add_argument(
        "--cpu-trace",
        action="store_true",
        help="CPU stand-in: torch.jit.trace instead of torch_neuronx.trace (no Neuron graph)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the manifest that would be written; trace nothing")
    return p


def _fail(message: str, code: int = 2) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def _model_dir_problem(path: Path) -> str | None:
    """Why ``path`` cannot be a model (checked without torch), or None."""
    if not path.is_dir():
        return f"--model {str(path)!r} is not a directory"
    if (path / "model.safetensors").is_file():
        if not (path / "config.json").is_file():
            return f"--model {str(path)!r} has model.safetensors but no config.json"
        return None
    checkpoints = path / "checkpoints"
    if checkpoints.is_dir() and any((c / "model.safetensors").is_file() for c in checkpoints.glob("step_*")):
        return None
    return (
        f"--model {str(path)!r} is neither a saved model (config.json + model.safetensors) "
        "nor a run directory with checkpoints"
    )


def _environment_problems(args) -> list[str]:
    if args.cpu_trace or args.dry_run:
        # The CPU modes need torch (any supported version) and bmojo, nothing from Neuron.
        found = []
        if importlib.util.find_spec("torch") is None:
            found.append("torch is not installed: install bmojo's CPU environment (bash scripts/bootstrap.sh)")
        if importlib.util.find_spec("bmojo") is None:
            found.append(check_env.MSG["bmojo"])
        return found
    missing, notes, _ = check_env.problems("export")
    return missing


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.check_steps < 0:
        return _fail(f"--check-steps must be at least 0, got {args.check_steps}")
    if args.tolerance is not None and not args.tolerance > 0:
        return _fail(f"--tolerance must be positive, got {args.tolerance}")
    if args.cpu_trace and args.dry_run:
        return _fail("--cpu-trace and --dry-run exclude each other")
    try:
        compiler_args = shlex.split(args.compiler_args)
    except ValueError as exc:
        return _fail(f"--compiler-args cannot be split into words: {exc}")
    problem = _model_dir_problem(Path(args.model))
    if problem:
        return _fail(problem)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        return _fail(f"--out {args.out!r} exists and is not a directory")
    taken = [name for name in OUTPUT_FILES if (out / name).exists()]
    if taken and not args.dry_run:
        return _fail(f"--out {args.out!r} already holds an export ({', '.join(taken)}); choose another directory")

    # The environment, before anything imports torch_neuronx (or torch: it may be missing or the wrong version).
    missing = _environment_problems(args)
    if missing:
        for line in missing:
            print(f"{check_env.PREFIX}: {line}", file=sys.stderr)
        print(
            f"{check_env.PREFIX}: environment not ready for export ({len(missing)} problem(s) above); "
            "see neuron/README.md",
            file=sys.stderr,
        )
        return check_env.EXIT_NOT_READY
    return export(args, compiler_args, out)


def _load_model(path: str, dtype):
    from bmojo.checkpoint import load_model, resolve_checkpoint
    from bmojo.errors import BMojoError

    try:
        checkpoint = resolve_checkpoint(path)
        model = load_model(checkpoint)
    except BMojoError as exc:
        raise SystemExit(_fail(str(exc)))
    return checkpoint, model.to(dtype).eval()


def export(args, compiler_args: list[str], out: Path) -> int:
    import torch
    from transformers.utils import logging as hf_logging

    from bmojo.trn1 import inference_graphs as ig

    hf_logging.disable_progress_bar()  # the weight-loading bar says nothing useful here
    dtype = getattr(torch, args.dtype)
    checkpoint, model = _load_model(args.model, dtype)
    config = model.config
    for p in model.parameters():
        p.requires_grad_(False)
    spec = ig.state_spec(config, args.batch_size, dtype)
    if args.cpu_trace:
        compiler = {"backend": "torch.jit.trace (CPU stand-in: not a Neuron graph)", "torch": torch.__version__}
    else:
        compiler = {"backend": "torch_neuronx.trace", "compiler_args": compiler_args, "torch": torch.__version__}
    info = ig.manifest(config, spec, args.batch_size, args.prompt_length, dtype, compiler)
    info["source"] = str(checkpoint)
    if args.dry_run:
        print(json.dumps(info, indent=2))
        return 0

    torch.manual_seed(0)
    prefill, decode = ig.PrefillGraph(model, spec).eval(), ig.DecodeGraph(model, spec).eval()
    prefill_inputs, decode_inputs = ig.example_inputs(config, spec, args.batch_size, args.prompt_length, dtype)
    out.mkdir(parents=True, exist_ok=True)
    traced = {}
    for name, module, inputs in (("prefill", prefill, prefill_inputs), ("decode", decode, decode_inputs)):
        start = time.time()
        with torch.no_grad(), warnings.catch_warnings():
            # torch.jit records tensor sizes while tracing and warns about every shape comparison; all of them
            # are on shapes fixed by the configuration, not on values (the eager comparison below checks it).
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=".*torch.jit.trace.* is deprecated")
            warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecations, seen by the tracer
            if args.cpu_trace:
                traced[name] = torch.jit.trace(module, inputs, check_trace=False)
            else:
                import torch_neuronx

                workdir = Path(args.compiler_workdir or out / "compiler_workdir") / name
                traced[name] = torch_neuronx.trace(
                    module, inputs, compiler_workdir=str(workdir), compiler_args=compiler_args
                )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)  # torch >= 2.10 deprecates torch.jit
            torch.jit.save(traced[name], str(out / info["files"][name]))
        print(f"{PROG}: traced {name} in {time.time() - start:.1f}s -> {out / info['files'][name]}", file=sys.stderr)

    from safetensors.torch import save_file

    save_file(ig.initial_state(config, spec, args.batch_size, dtype), str(out / ig.INITIAL_STATE_FILE))
    (out / ig.MANIFEST).write_text(json.dumps(info, indent=2) + "\n")
    if args.check_steps:
        return verify(model, out, args)
    return 0


def verify(model, out: Path, args) -> int:
    """Load the saved graphs back and compare their logits with the eager model's (teacher-forced tokens)."""
    import torch

    from bmojo.trn1 import inference_graphs as ig

    tolerance = args.tolerance or (1e-3 if args.dtype == "float32" else 0.1)
    runner = ig.NeuronBMojoGenerator.load(out)
    generator = torch.Generator().manual_seed(1)
    length = args.prompt_length + args.check_steps
    ids = torch.randint(0, model.config.vocab_size, (args.batch_size, length), generator=generator)
    with torch.no_grad():
        expected = model(ids).logits.float()
        logits, state = runner.start(ids[:, : args.prompt_length])
        worst_prefill = (logits.float() - expected[:, args.prompt_length - 1]).abs().max().item()
        worst_decode = 0.0
        for t in range(args.prompt_length, length):
            logits, state = runner.step(ids[:, t], state)
            worst_decode = max(worst_decode, (logits.float() - expected[:, t]).abs().max().item())
    print(
        f"{PROG}: check against the eager CPU model: prefill max |dlogits| {worst_prefill:.3g}, "
        f"{args.check_steps} decode steps max |dlogits| {worst_decode:.3g} (tolerance {tolerance:g})",
        file=sys.stderr,
    )
    if max(worst_prefill, worst_decode) > tolerance:
        return _fail(f"the exported graphs differ from the eager model by more than {tolerance:g}", code=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
