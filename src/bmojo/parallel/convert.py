"""Convert model checkpoints between tensor-parallel degrees.

    python -m bmojo.parallel.convert --in DIR --out DIR --tp N

A checkpoint directory holds ``config.json`` (the full model's config, whatever the TP degree) and either

* ``model.safetensors`` (TP=1, as ``save_pretrained`` writes it; a ``model.safetensors.index.json`` with its
  shards is read too), or
* ``model-tp{rank}-of-{N}.safetensors`` for ``rank = 0 .. N-1``: rank ``rank``'s tensors under the full model's
  parameter names (``shard_model``'s ``state_dict()``), sliced by ``plan.parameter_rules``.

``--tp 1`` writes ``model.safetensors``, loadable with ``BMojoForCausalLM.from_pretrained``. With tied embeddings
``lm_head.weight`` is not stored (as ``save_pretrained`` does). Other files of the input directory (tokenizer,
generation config) are copied; optimizer/training state (``training_state.*``) is not converted and not copied.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..configuration_bmojo import BMojoConfig
from ..errors import BMojoError
from .plan import merge_state_dicts, split_state_dict

FULL = "model.safetensors"
FULL_INDEX = "model.safetensors.index.json"
_SHARD = re.compile(r"model-tp(\d+)-of-(\d+)\.safetensors")
_NOT_COPIED = re.compile(r"(model.*\.safetensors(\.index\.json)?|training_state\..*|config\.json)")


def shard_file(rank: int, tp_size: int) -> str:
    return f"model-tp{rank}-of-{tp_size}.safetensors"


def _tp_files(directory: Path) -> dict[int, dict[int, Path]]:
    found: dict[int, dict[int, Path]] = {}
    for path in directory.iterdir():
        m = _SHARD.fullmatch(path.name)
        if m:
            found.setdefault(int(m.group(2)), {})[int(m.group(1))] = path
    return found


def load_full_state_dict(directory: str | Path) -> tuple[BMojoConfig, dict[str, torch.Tensor]]:
    """Config and full state dict of a checkpoint directory of any TP degree."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise BMojoError(f"{str(directory)!r} has no config.json")
    config = BMojoConfig.from_pretrained(directory, trust_remote_code=False)
    shards = _tp_files(directory)
    if len(shards) > 1:
        raise BMojoError(f"{str(directory)!r} mixes tensor-parallel degrees {sorted(shards)}")
    if shards:
        (tp_size, files), = shards.items()
        missing = sorted(set(range(tp_size)) - set(files))
        if missing:
            raise BMojoError(f"{str(directory)!r} lacks the shards of ranks {missing} (TP={tp_size})")
        return config, merge_state_dicts([load_file(files[r]) for r in range(tp_size)], config)
    if (directory / FULL).is_file():
        return config, load_file(directory / FULL)
    if (directory / FULL_INDEX).is_file():
        names = sorted(set(json.loads((directory / FULL_INDEX).read_text())["weight_map"].values()))
        return config, {k: v for name in names for k, v in load_file(directory / name).items()}
    raise BMojoError(f"{str(directory)!r} holds no model weights ({FULL} or model-tp*-of-*.safetensors)")


def _storable(state: dict[str, torch.Tensor], config: BMojoConfig) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors sharing storage; the tied head is restored from the embedding at load time.
    if config.tie_word_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    return {k: v.contiguous() for k, v in state.items()}


def save_state_dict(directory: str | Path, config: BMojoConfig, full: dict[str, torch.Tensor], tp_size: int) -> None:
    """Write ``config.json`` and the weights of ``full`` split for ``tp_size`` ranks."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / FULL).exists() or (directory / FULL_INDEX).exists() or _tp_files(directory):
        raise BMojoError(f"{str(directory)!r} already holds model weights; choose an empty output directory")
    shards = split_state_dict(full, config, tp_size)  # validates tp_size before anything is written
    config.save_pretrained(directory)
    names = [FULL] if tp_size == 1 else [shard_file(rank, tp_size) for rank in range(tp_size)]
    for name, shard in zip(names, shards):
        save_file(_storable(shard, config), directory / name, metadata={"format": "pt"})


def rank_state_dict(directory: str | Path, tp_rank: int, tp_size: int) -> dict[str, torch.Tensor]:
    """Rank ``tp_rank``'s tensors for a ``tp_size``-way sharded model, from a checkpoint of any TP degree
    (``model.load_state_dict(sd, strict=False)``: the tied head may be absent)."""
    files = _tp_files(Path(directory)).get(tp_size)
    if files is not None and tp_rank in files:
        return load_file(files[tp_rank])
    config, full = load_full_state_dict(directory)
    return split_state_dict(full, config, tp_size)[tp_rank]


def convert(src: str | Path, dst: str | Path, tp_size: int) -> None:
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise BMojoError("--in and --out must be different directories")
    try:
        config, full = load_full_state_dict(src)
        save_state_dict(dst, config, full, tp_size)
    except ValueError as exc:  # shards that do not fit together, a degree the config cannot be split by
        raise BMojoError(str(exc)) from exc
    for path in src.iterdir():
        if path.is_file() and not _NOT_COPIED.fullmatch(path.name):
            shutil.copy2(path, dst / path.name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bmojo.parallel.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("--in", dest="src", required=True, help="checkpoint directory (any TP degree)")
    parser.add_argument("--out", dest="dst", required=True, help="new directory for the converted checkpoint")
    parser.add_argument("--tp", type=int, required=True, help="tensor-parallel degree of the output (1: full model)")
    args = parser.parse_args(argv)
    try:
        convert(args.src, args.dst, args.tp)
    except BMojoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
