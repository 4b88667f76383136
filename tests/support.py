"""Helpers the tests share: the tiny model, token batches, and the `bmojo` command run in-process.

(pytest puts tests/ on sys.path, so test modules ``from support import ...``.)"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from bmojo import BMojoForCausalLM, preset_config
from bmojo.cli import main


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float64, **overrides) -> BMojoForCausalLM:
    """The ``tiny`` preset (every feature on, chunks of 4 tokens) with ``overrides``, seeded, in eval mode."""
    torch.manual_seed(seed)
    return BMojoForCausalLM(preset_config("tiny", **overrides)).to(dtype).eval()


def tokens(bsz: int, length: int, vocab: int = 64, seed: int = 1) -> torch.Tensor:
    """Reproducible token ids ``[bsz, length]`` in ``[3, vocab)`` (above the special tokens)."""
    return torch.randint(3, vocab, (bsz, length), generator=torch.Generator().manual_seed(seed))


WORDS = ["def", "return", "self", "import", "class", "if", "else", "for", "in", "range", "(x)", ":", "\n    "]


def word_salad(root: Path, names: tuple[str, ...] = ("a.py",), words: int = 3000) -> Path:
    """A small, learnable corpus in ``root``: one file of Python-ish word salad per name (seeded)."""
    rng = random.Random(0)
    for name in names:
        (root / name).write_text("".join(rng.choice(WORDS) + " " for _ in range(words)))
    return root


def repeated_text(root: Path) -> Path:
    """The smallest corpus a run can train on: one short function, 200 times, in ``root/a.txt``."""
    (root / "a.txt").write_text("def f(x):\n    return x + 1\n" * 200)
    return root


def train_args(data: Path | str, out: Path, *extra: str) -> list[str]:
    """``bmojo train`` arguments of a fast run of the tiny preset (16-token windows, batch 2, one thread)."""
    return [
        "train", "--preset", "tiny", "--data", str(data), "--out", str(out), "--seq-len", "16", "--batch-size", "2",
        "--threads", "1", "--warmup-steps", "1", "--set", "train.sample_tokens=4", "--set", "train.eval_batches=1",
        *extra,
    ]  # fmt: skip


def cli(argv: list[str]) -> int:
    """``bmojo.cli.main``'s exit status, also when argparse exits."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def one_error_line(capsys) -> str:
    """The single ``bmojo: error: ...`` line on stderr (asserted: one line, no traceback), without its prefix."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("bmojo: error: "), err
    return lines[0][len("bmojo: error: ") :]


def metrics_records(run_dir: Path, split: str) -> list[dict]:
    """A run's ``metrics.jsonl`` rows of ``split`` ("train": step, losses and gradient norm; "val": step, LM loss)."""
    keys = ("step", "loss", "lm_loss", "innovation_loss", "grad_norm") if split == "train" else ("step", "lm_loss")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in keys} for r in rows if r["split"] == split]


class Killed(BaseException):
    """Stands for SIGKILL: not an ``Exception``, so no handler records anything and the process's work just stops."""


def die_after_saving(monkeypatch, module, at_step: int, folder_prefix: str = "", raising=Killed):
    """Patch ``module.save_checkpoint`` so that the process dies (raises ``raising``: ``Killed``, or
    ``KeyboardInterrupt`` for Ctrl-C) right after the checkpoint of ``at_step`` is in place (in a folder whose name
    starts with ``folder_prefix``); returns the real function."""
    real = module.save_checkpoint

    def save_then_die(folder, step, *args, **kwargs):
        saved = real(folder, step, *args, **kwargs)
        if step == at_step and Path(folder).name.startswith(folder_prefix):
            raise raising
        return saved

    monkeypatch.setattr(module, "save_checkpoint", save_then_die)
    return real


def count_training_steps(monkeypatch) -> list:
    """A list that gains one item per training forward of any ``BMojoForCausalLM`` from now on."""
    steps = []
    forward = BMojoForCausalLM.forward

    def counted(self, *args, **kwargs):
        if self.training and torch.is_grad_enabled():
            steps.append(1)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(BMojoForCausalLM, "forward", counted)
    return steps
