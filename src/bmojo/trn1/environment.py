"""Is this machine ready to train or compile bmojo on Trainium (trn1, Neuron SDK 2.28)?

    python neuron/check_env.py --for train   [--cores N]   # torchrun training (neuron/train_trn1_*.sh)
    python neuron/check_env.py --for compile [--cores N]   # neuron_parallel_compile (neuron/precompile.sh)
    python neuron/check_env.py --for export                # torch_neuronx.trace (neuron/export_inference.py)

(``python -m bmojo.trn1.environment`` is the same where bmojo imports; ``neuron/check_env.py`` runs this file by its
path, so the check also works where importing the bmojo package would fail: torch missing, bmojo not installed.)

Prints one line per missing piece, ``bmojo-neuron: <what is missing>: <what to do>``, then a summary line, and
exits with status 3; prints one ``environment OK`` line and exits 0 when nothing is missing. The messages are
fixed strings (tests match them), so change them together with tests/test_neuron_scripts.py.

Only the standard library is used, and nothing is imported from the Neuron packages unless their versions are
already right, so the checker itself never fails with a traceback in a wrong or half-installed environment. Keep it
so: no import of bmojo or of any third-party package at module level.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import importlib.metadata
import importlib.util
import os
import shutil
import sys

PREFIX = "bmojo-neuron"
EXIT_NOT_READY = 3  # (bad arguments exit with 2, argparse's status)

# The Neuron DLAMI's virtual environment with torch-neuronx and NxD Core for PyTorch 2.9 (Neuron DLAMI guide).
VENV = "/opt/aws_neuronx_venv_pytorch_2_9"
ACTIVATE = f"activate the Neuron SDK 2.28 PyTorch 2.9 environment (source {VENV}/bin/activate)"
ON_TRN1 = "run this on a trn1 instance with the Neuron SDK 2.28 PyTorch environment"
CORES_PER_DEVICE = 2  # trn1: each Trainium device has two NeuronCores-v2

# The exact messages (one per missing piece).
MSG = {
    "python": "Python 3.10 or newer is required, found {found}: " + ACTIVATE,
    "torch_missing": "torch is not installed: " + ACTIVATE,
    "torch_version": "torch 2.9.x is required (Neuron SDK 2.28), found torch {found}: " + ACTIVATE,
    "xla_missing": "torch-xla is not installed: " + ON_TRN1,
    "xla_version": "torch-xla 2.9.x is required (Neuron SDK 2.28), found torch-xla {found}: " + ACTIVATE,
    "neuronx_missing": "torch-neuronx is not installed: " + ON_TRN1,
    "neuronx_version": (
        "torch-neuronx {found} is not a Neuron SDK build for torch 2.9 (the PyPI package of that name is a "
        "placeholder): " + ACTIVATE
    ),
    "neuronx_import": "torch-neuronx cannot be imported ({found}): " + ACTIVATE,
    "compiler": "neuronx-cc is not on PATH: the Neuron compiler comes with the Neuron SDK 2.28 PyTorch environment; "
    + ACTIVATE,
    "torchrun": "torchrun is not on PATH: " + ACTIVATE,
    "parallel_compile": "neuron_parallel_compile is not on PATH: it comes with torch-neuronx; " + ACTIVATE,
    "bmojo": (
        "bmojo is not installed in this environment: run `pip install -e .` in the repository (see neuron/README.md)"
    ),
    "devices": "no Neuron devices found (/dev/neuron*): " + ON_TRN1 + " (the Neuron driver must be loaded: neuron-ls)",
    "cores": (
        "this launch needs {need} NeuronCores but this machine has {devices} Neuron device(s) = {have} NeuronCores: "
        "use the script for this instance size (trn1.2xlarge: 2, trn1.32xlarge: 32)"
    ),
}
NOTE_NXD = "note: neuronx-distributed is not installed (needed only for tensor parallelism)"

# What each purpose needs beyond torch + torch-xla + torch-neuronx + neuronx-cc + bmojo + devices.
PURPOSES = {"train": ("torchrun",), "compile": ("torchrun", "parallel_compile"), "export": ()}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _is_2_9(version: str) -> bool:
    return version.split("+")[0].split(".")[:2] == ["2", "9"]


def neuron_devices(dev_dir: str = "/dev") -> list[str]:
    """The Neuron device nodes (``/dev/neuron0`` ...), one per Trainium device."""
    return sorted(p for p in glob.glob(os.path.join(dev_dir, "neuron*")) if os.path.basename(p)[6:].isdigit())


# Long on purpose: one check per requirement of the trn1 environment, in the order they are reported.
def problems(purpose: str, cores: int = 0, dev_dir: str = "/dev") -> tuple[list[str], list[str], dict]:
    """``(problems, notes, found)``: one message per missing piece, informational notes, and what was found."""
    found: dict[str, str] = {}
    out: list[str] = []
    if sys.version_info < (3, 10):
        out.append(MSG["python"].format(found=".".join(map(str, sys.version_info[:3]))))

    # Versions from package metadata first: importing torch-xla against the wrong torch dies with undefined
    # symbols, so nothing is imported until the versions are known to fit together.
    versions_ok = True
    torch_version = _version("torch") if _has_module("torch") else None
    if torch_version is None:
        out.append(MSG["torch_missing"])
        versions_ok = False
    elif not _is_2_9(torch_version):
        out.append(MSG["torch_version"].format(found=torch_version))
        versions_ok = False
    else:
        found["torch"] = torch_version

    xla_version = _version("torch-xla") or _version("torch_xla")
    if not _has_module("torch_xla"):
        out.append(MSG["xla_missing"])
        versions_ok = False
    elif xla_version is not None and not _is_2_9(xla_version):
        out.append(MSG["xla_version"].format(found=xla_version))
        versions_ok = False
    else:
        found["torch-xla"] = xla_version or "?"

    neuronx_version = _version("torch-neuronx") or _version("torch_neuronx")
    if not _has_module("torch_neuronx"):
        out.append(MSG["neuronx_missing"])
        versions_ok = False
    elif neuronx_version is not None and not _is_2_9(neuronx_version):
        out.append(MSG["neuronx_version"].format(found=neuronx_version))
        versions_ok = False
    else:
        found["torch-neuronx"] = neuronx_version or "?"

    if versions_ok:
        try:
            importlib.import_module("torch_neuronx")  # also imports torch and torch_xla
        except Exception as exc:  # any failure here is an environment problem, reported in one line
            first = (str(exc).splitlines() or [""])[0][:200]
            out.append(MSG["neuronx_import"].format(found=f"{type(exc).__name__}: {first}"))

    if shutil.which("neuronx-cc") is None:
        out.append(MSG["compiler"])
    else:
        found["neuronx-cc"] = _version("neuronx-cc") or "on PATH"
    for tool in PURPOSES[purpose]:
        if shutil.which("torchrun" if tool == "torchrun" else "neuron_parallel_compile") is None:
            out.append(MSG[tool])
    if not _has_module("bmojo"):
        out.append(MSG["bmojo"])

    devices = neuron_devices(dev_dir)
    if not devices:
        out.append(MSG["devices"])
    else:
        have = CORES_PER_DEVICE * len(devices)
        found["NeuronCores"] = str(have)
        if cores > have:
            out.append(MSG["cores"].format(need=cores, devices=len(devices), have=have))

    notes = [] if _has_module("neuronx_distributed") else [NOTE_NXD]
    return out, notes, found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="check_env.py", description="Check the trn1 environment for bmojo.")
    parser.add_argument("--for", dest="purpose", choices=sorted(PURPOSES), default="train")
    parser.add_argument("--cores", type=int, default=0, help="NeuronCores this launch needs on this machine")
    args = parser.parse_args(argv)
    missing, notes, found = problems(args.purpose, args.cores)
    for note in notes:
        print(f"{PREFIX}: {note}", file=sys.stderr)
    if missing:
        for line in missing:
            print(f"{PREFIX}: {line}", file=sys.stderr)
        print(
            f"{PREFIX}: environment not ready for {args.purpose} ({len(missing)} problem(s) above); "
            "see neuron/README.md",
            file=sys.stderr,
        )
        return EXIT_NOT_READY
    summary = ", ".join(f"{name} {value}" for name, value in found.items())
    print(f"{PREFIX}: environment OK for {args.purpose}: {summary}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
