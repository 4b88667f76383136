"""Checkpoints: ``<run>/checkpoints/step_XXXXXX/`` holds

* ``model.safetensors`` + ``config.json`` (``save_pretrained``: loadable with ``BMojoForCausalLM.from_pretrained``);
* ``training_state.safetensors``: the AdamW moments and the torch RNG state;
* ``training_state.json``: the step, tokens seen and the optimizer's hyperparameters;
* ``checksums.sha256``: the SHA-256 of each of the files above (``sha256sum -c`` reads it), checked by every load.

Everything is written into a hidden temporary directory beside the final one, flushed to disk, and renamed into
place in one step, so a crash during a save never leaves a half-written ``step_*`` directory and never touches
the previous ones: the newest ``step_*`` directory is always the last good checkpoint, unless the disk later
damages it, which the checksums catch. A failed save (a full disk) removes its temporary directory and raises a
``BMojoError``. A directory without ``checksums.sha256`` (a bare ``save_pretrained``) loads unverified. Nothing is
unpickled: weights and optimizer state load through safetensors only.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .configuration_bmojo import BMojoConfig
from .errors import BMojoError
from .modeling_bmojo import BMojoForCausalLM

CHECKPOINTS = "checkpoints"
STATE_TENSORS = "training_state.safetensors"
STATE_JSON = "training_state.json"
MANIFEST = "checksums.sha256"
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
    if (path / "model.safetensors").is_file() or _tp_shards(path):
        return path
    found = list_checkpoints(path)
    if not found:
        raise BMojoError(
            f"{str(path)!r} is neither a checkpoint (model.safetensors) nor a run directory with checkpoints"
        )
    return found[-1]


def _tp_shards(checkpoint: Path) -> list[Path]:
    """The ``model-tp{r}-of-{N}.safetensors`` files of a ``--tp`` run's checkpoint (``bmojo.parallel.training``)."""
    return sorted(checkpoint.glob("model-tp*-of-*.safetensors")) if checkpoint.is_dir() else []


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step_{step:06d}"


def run_dir_of(checkpoint: Path) -> Path:
    return checkpoint.parent.parent


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one step: readers see the old or the new file, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_checkpoint(run_dir: str | Path, step: int, model, optimizer, state: dict, keep: int) -> Path:
    """Atomically write the checkpoint of ``step``, then delete all but the ``keep`` newest. A failure (a full disk)
    leaves no temporary directory behind and raises a ``BMojoError`` naming the checkpoint."""
    final = checkpoint_path(run_dir, step)
    root = final.parent
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        _write_checkpoint(tmp, step, model, optimizer, state)
        os.replace(tmp, final)  # the commit point
        fsync(root)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, (OSError, SafetensorError)):
            raise BMojoError(f"cannot save the checkpoint {final}: {_reason(exc)}") from exc
        raise
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old)
    for stale in root.glob(".tmp-*"):  # left behind by crashed saves
        shutil.rmtree(stale, ignore_errors=True)
    return final


def _reason(exc: Exception) -> str:
    return getattr(exc, "strerror", None) or str(exc).splitlines()[0]


def _write_checkpoint(tmp: Path, step: int, model, optimizer, state: dict) -> None:
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
    write_manifest(tmp)
    for f in tmp.iterdir():
        fsync(f)
    fsync(tmp)


# ---------------------------------------------------------------------------------------------------------------
# Checksums
# ---------------------------------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(checkpoint: Path) -> None:
    """``checksums.sha256``: one ``<sha256>  <file>`` line per file of the checkpoint (the ``sha256sum`` format)."""
    files = sorted(p for p in checkpoint.iterdir() if p.is_file() and p.name != MANIFEST)
    (checkpoint / MANIFEST).write_text("".join(f"{_sha256(p)}  {p.name}\n" for p in files))


def verify_checkpoint(checkpoint: Path) -> None:
    """Check every file against ``checksums.sha256``; a ``BMojoError`` names the checkpoint and the first bad file.
    Without a manifest (a directory ``save_pretrained`` wrote) there is nothing to check."""
    manifest = checkpoint / MANIFEST
    if not manifest.is_file():
        return
    try:
        entries = [line.split("  ", 1) for line in manifest.read_text().splitlines()]
        expected = {name: digest for digest, name in entries}
    except (OSError, UnicodeDecodeError, ValueError):
        raise BMojoError(f"checkpoint {checkpoint} is damaged: its {MANIFEST} is unreadable") from None
    for name, digest in expected.items():
        path = checkpoint / name
        if not path.is_file():
            raise BMojoError(f"checkpoint {checkpoint} is damaged: {name} is missing")
        if _sha256(path) != digest:
            raise BMojoError(f"checkpoint {checkpoint} is damaged: {name} does not match its checksum in {MANIFEST}")


def newest_verified(run_dir: Path, warn) -> tuple[Path, list[Path]]:
    """The newest checkpoint of ``run_dir`` whose checksums hold, and the newer, damaged ones (``warn`` tells of
    each). With none intact, the newest one's ``BMojoError``."""
    found = list_checkpoints(run_dir)
    damaged: list[Path] = []
    for checkpoint in reversed(found):
        try:
            verify_checkpoint(checkpoint)
            return checkpoint, damaged
        except BMojoError as exc:
            if checkpoint == found[0]:
                newest = f"{exc}" if not damaged else f"checkpoint {damaged[0]} is damaged; no earlier one is intact"
                raise BMojoError(newest) from None
            warn(f"{exc}; falling back to the previous checkpoint")
            damaged.append(checkpoint)
    raise BMojoError(f"no checkpoint in {Path(run_dir) / CHECKPOINTS}")


def set_aside(checkpoint: Path) -> Path:
    """Rename a damaged checkpoint to ``step_XXXXXX.damaged``: kept for inspection, no longer a checkpoint."""
    target = checkpoint.with_name(checkpoint.name + ".damaged")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(checkpoint, target)
    return target


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------
_CONFIG_DEFAULTS = {
    k: p.default for k, p in inspect.signature(BMojoConfig.__init__).parameters.items() if k not in ("self", "kwargs")
}


_KIND_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list"}


def _config_values(checkpoint: Path) -> dict:
    """``config.json`` as a dict whose model settings have the types of BMojoConfig's defaults (TypeError if not)."""
    values = json.loads((checkpoint / "config.json").read_text())
    if not isinstance(values, dict):
        raise TypeError("config.json is not a JSON object")
    for key, default in _CONFIG_DEFAULTS.items():
        value = values.get(key, default)
        if default is None or value is None:
            continue
        kinds = (int, float) if isinstance(default, float) else type(default)
        if not isinstance(value, kinds) or isinstance(value, bool) != isinstance(default, bool):
            raise TypeError(f"{key} must be {_KIND_NAMES[type(default)]}, got {value!r}")
    return values


def _read_config(checkpoint: Path, what: str) -> BMojoConfig:
    try:
        return BMojoConfig.from_dict(_config_values(checkpoint))
    except (OSError, ValueError, TypeError) as exc:
        raise BMojoError(f"cannot {what} in {checkpoint}: {_reason(exc)}") from None


def load_config(checkpoint: Path) -> BMojoConfig:
    return _read_config(checkpoint, "read the model configuration")


def _check_shapes(checkpoint: Path, config: BMojoConfig) -> None:
    """The weights' shapes against those ``config.json`` implies (a model built on the meta device: no memory)."""
    path = checkpoint / "model.safetensors"
    if not path.is_file():
        return  # a sharded or missing file: from_pretrained reports it
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in BMojoForCausalLM(config).state_dict().items()}
    try:
        with safe_open(path, framework="pt") as f:
            stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (OSError, SafetensorError) as exc:
        raise BMojoError(f"cannot load the model in {checkpoint}: {_reason(exc)}") from None
    for name, shape in stored.items():
        if name in expected and expected[name] != shape:
            raise BMojoError(
                f"cannot load the model in {checkpoint}: {name} has shape {list(shape)} in model.safetensors but "
                f"config.json implies {list(expected[name])}"
            )


def load_model(checkpoint: Path) -> BMojoForCausalLM:
    """The model of a checkpoint, its checksums verified first."""
    # No code from a checkpoint directory ever runs. transformers 4.57's from_pretrained imports a local
    # custom_generate/generate.py even with trust_remote_code=False, so such a directory is refused outright.
    if (Path(checkpoint) / "custom_generate").exists():
        raise BMojoError(
            f"{checkpoint} holds custom_generate/, Python code that bmojo never runs: remove it to load the model"
        )
    verify_checkpoint(checkpoint)
    config = _read_config(checkpoint, "load the model")
    if not (checkpoint / "model.safetensors").is_file() and _tp_shards(checkpoint):
        return _load_sharded(checkpoint, config)
    _check_shapes(checkpoint, config)
    try:
        model = BMojoForCausalLM.from_pretrained(
            checkpoint, config=config, use_safetensors=True, trust_remote_code=False
        )
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise BMojoError(f"cannot load the model in {checkpoint}: {_reason(exc)}") from exc
    return model


def _load_sharded(checkpoint: Path, config: BMojoConfig) -> BMojoForCausalLM:
    """The full model of a ``--tp`` checkpoint without the merged ``model.safetensors`` (one saved before the end
    of the run): its shards merged by the sharding plan (``bmojo.parallel.convert``)."""
    from .parallel.convert import load_full_state_dict

    try:
        _, full = load_full_state_dict(checkpoint)
        model = BMojoForCausalLM(config).to(next(iter(full.values())).dtype)
        missing, unexpected = model.load_state_dict(full, strict=False)
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise BMojoError(f"cannot load the model in {checkpoint}: {_reason(exc)}") from exc
    if [k for k in missing if k != "lm_head.weight"] or unexpected:
        raise BMojoError(f"cannot load the model in {checkpoint}: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model.eval()


def _read_training_state(checkpoint: Path) -> tuple[dict, dict]:
    for name in (STATE_JSON, STATE_TENSORS):
        if not (checkpoint / name).is_file():
            raise BMojoError(f"checkpoint {checkpoint} has no {name}")
    try:
        state = json.loads((checkpoint / STATE_JSON).read_text())
        tensors = load_file(checkpoint / STATE_TENSORS)
    except (OSError, ValueError, SafetensorError) as exc:
        raise BMojoError(f"cannot read the training state in {checkpoint}: {_reason(exc)}") from None
    if not (isinstance(state, dict) and isinstance(state.get("step"), int) and isinstance(state.get("tokens"), int)):
        raise BMojoError(f"{checkpoint / STATE_JSON} is malformed: expected an object with integer step and tokens")
    return state, tensors


def load_training_state(checkpoint: Path, optimizer) -> dict:
    """Restore the optimizer and the torch RNG; return the JSON state (``step``, ``tokens``, ...)."""
    state, tensors = _read_training_state(checkpoint)
    try:
        rng = tensors.pop("rng.torch")
        per_param: dict[int, dict] = {}
        for key, t in tensors.items():
            _, index, name = key.split(".", 2)
            per_param.setdefault(int(index), {})[name] = t
        groups = state.pop("param_groups")
        for group in groups:
            group["betas"] = tuple(group["betas"])
    except (KeyError, TypeError, ValueError) as exc:
        raise BMojoError(f"the training state in {checkpoint} is malformed: {exc!r}") from None
    try:
        optimizer.load_state_dict({"state": per_param, "param_groups": groups})
    except (ValueError, KeyError, TypeError) as exc:
        raise BMojoError(f"the optimizer state in {checkpoint} does not fit the model: {exc}") from exc
    torch.set_rng_state(rng)
    return state
