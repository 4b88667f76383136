"""Checkpoints: ``<run>/checkpoints/step_XXXXXX/`` holds

* ``model.safetensors`` + ``config.json`` (``save_pretrained``: loadable with ``BMojoForCausalLM.from_pretrained``);
* ``training_state.safetensors``: the AdamW moments and the torch RNG state;
* ``training_state.json``: the step, tokens seen and the optimizer's hyperparameters.

Everything is written into a hidden temporary directory beside the final one, flushed to disk, and renamed into
place in one step, so a crash during a save never leaves a half-written ``step_*`` directory and never touches
the previous ones: the newest ``step_*`` directory is always the last good checkpoint. Nothing is unpickled:
weights and optimizer state load through safetensors only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .configuration_bmojo import BMojoConfig
from .errors import BMojoError
from .modeling_bmojo import BMojoForCausalLM

CHECKPOINTS = "checkpoints"
STATE_TENSORS = "training_state.safetensors"
STATE_JSON = "training_state.json"
_NAME = re.compile(r"step_(\d+)")


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(p.name[5:]))


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory itself, or the newest checkpoint of a run directory."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        return path
    found = list_checkpoints(path)
    if not found:
        raise BMojoError(
            f"{str(path)!r} is neither a checkpoint (model.safetensors) nor a run directory with checkpoints"
        )
    return found[-1]


def run_dir_of(checkpoint: Path) -> Path:
    return checkpoint.parent.parent


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one step: readers see the old or the new file, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(run_dir: str | Path, step: int, model, optimizer, state: dict, keep: int) -> Path:
    """Atomically write the checkpoint of ``step``, then delete all but the ``keep`` newest."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    # Host copies: safetensors writes CPU memory, and on XLA the tensors live on the device. A tensor shared by two
    # names (the tied embedding / lm_head) stays one shared copy, which save_pretrained writes once.
    copies: dict[int, torch.Tensor] = {}

    def on_host(t: torch.Tensor) -> torch.Tensor:
        return copies.setdefault(id(t), t.detach().cpu())

    model.save_pretrained(tmp, state_dict={k: on_host(v) for k, v in model.state_dict(keep_vars=True).items()})
    opt = optimizer.state_dict()
    tensors = {f"optimizer.{i}.{name}": on_host(t) for i, s in opt["state"].items() for name, t in s.items()}
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, tmp / STATE_TENSORS)
    (tmp / STATE_JSON).write_text(json.dumps({**state, "step": step, "param_groups": opt["param_groups"]}, indent=2))
    for f in tmp.iterdir():
        _fsync(f)
    _fsync(tmp)
    os.replace(tmp, final)  # the commit point
    _fsync(root)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old)
    for stale in root.glob(".tmp-*"):  # left behind by crashed saves
        shutil.rmtree(stale, ignore_errors=True)
    return final


def load_config(checkpoint: Path) -> BMojoConfig:
    try:
        return BMojoConfig.from_json_file(str(checkpoint / "config.json"))
    except (OSError, ValueError) as exc:
        raise BMojoError(f"cannot read the model configuration in {checkpoint}: {str(exc).splitlines()[0]}") from None


def load_model(checkpoint: Path) -> BMojoForCausalLM:
    # No code from a checkpoint directory ever runs. transformers 4.57's from_pretrained imports a local
    # custom_generate/generate.py even with trust_remote_code=False, so such a directory is refused outright.
    if (Path(checkpoint) / "custom_generate").exists():
        raise BMojoError(
            f"{checkpoint} holds custom_generate/, Python code that bmojo never runs: remove it to load the model"
        )
    try:
        model = BMojoForCausalLM.from_pretrained(checkpoint, use_safetensors=True, trust_remote_code=False)
    except (OSError, ValueError, SafetensorError) as exc:
        raise BMojoError(f"cannot load the model in {checkpoint}: {str(exc).splitlines()[0]}") from exc
    return model


def load_training_state(checkpoint: Path, optimizer) -> dict:
    """Restore the optimizer and the torch RNG; return the JSON state (``step``, ...)."""
    state = json.loads((checkpoint / STATE_JSON).read_text())
    tensors = load_file(checkpoint / STATE_TENSORS)
    torch.set_rng_state(tensors.pop("rng.torch"))
    per_param: dict[int, dict] = {}
    for key, t in tensors.items():
        _, index, name = key.split(".", 2)
        per_param.setdefault(int(index), {})[name] = t
    groups = state.pop("param_groups")
    for group in groups:
        group["betas"] = tuple(group["betas"])
    try:
        optimizer.load_state_dict({"state": per_param, "param_groups": groups})
    except ValueError as exc:
        raise BMojoError(f"the optimizer state in {checkpoint} does not fit the model: {exc}") from exc
    return state
