"""scripts/bench_step.py --memory: the profiler's tensor peak of a training step is a property of the code (the same
on every run), holds at least what autograd saves plus the gradients and AdamW's moments, and falls with activation
checkpointing; the CLI names the tree it imported and both peaks."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


step = _load("bench_step")
throughput = _load("bench_throughput")


def _tensor_peak(checkpointing, selective_recompute=False, length=256):
    args = SimpleNamespace(preset="tiny", checkpointing=checkpointing, selective_recompute=selective_recompute)
    model, optimizer = step.build(args)
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    return step.peak_tensor_bytes(model, optimizer, ids), model, ids


def test_the_tensor_peak_is_the_same_every_run_and_holds_the_saved_activations_gradients_and_moments():
    peak, model, ids = _tensor_peak(False)
    again, _, _ = _tensor_peak(False)
    assert peak == again
    fresh, _ = step.build(SimpleNamespace(preset="tiny", checkpointing=False, selective_recompute=False))
    saved = throughput.activation_bytes(fresh, ids)
    parameters = 4 * sum(p.numel() for p in model.parameters())
    assert peak >= saved + parameters, (peak, saved, parameters)  # saved activations live while gradients appear
    assert peak >= 3 * parameters  # gradients and AdamW's two moments (created by this first step)


def test_checkpointing_lowers_the_tensor_peak():
    plain, _, _ = _tensor_peak(False)
    checkpointed, _, _ = _tensor_peak(True)
    both, _, _ = _tensor_peak(True, True)
    assert checkpointed < 0.8 * plain, (checkpointed, plain)
    assert both <= checkpointed, (both, checkpointed)


def test_the_memory_mode_prints_the_tree_it_imported_and_both_peaks():
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_step.py"), "--preset", "tiny", "--length", "128",
         "--memory", "--checkpointing"],
        capture_output=True, text=True, env=env, check=True,
    )  # fmt: skip
    line = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(line["package"]).resolve() == (ROOT / "src" / "bmojo" / "__init__.py").resolve()
    assert line["checkpointing"] and not line["selective_recompute"] and line["length"] == 128
    assert 0 < line["peak_tensor_mib"] and 0 < line["peak_resident_mib"]
