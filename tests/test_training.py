"""Training: schedule, run directory, checkpoints, exact resume after SIGKILL, DDP, divergence."""

import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bmojo import checkpoint as ckpt
from bmojo.cli import main
from bmojo.settings import TrainConfig
from bmojo.training import learning_rate
from support import word_salad

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A small, learnable text corpus: two files of Python-ish word salad."""
    return word_salad(tmp_path_factory.mktemp("corpus"), ("a.py", "b.py"))


def tiny(corpus: Path, out: Path, *extra: str) -> list[str]:
    """Arguments of a fast, deterministic training run of the "tiny" preset."""
    return [
        "train", "--preset", "tiny", "--data", str(corpus), "--out", str(out), "--seq-len", "32", "--batch-size", "4",
        "--threads", "1", "--lr", "3e-3", "--warmup-steps", "2",
        "--set", "train.eval_batches=2", "--set", "train.sample_tokens=16", *extra,
    ]  # fmt: skip


def records(run: Path, split: str) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    keys = (
        ("step", "loss", "lm_loss", "innovation_loss", "lr", "grad_norm") if split == "train" else ("step", "lm_loss")
    )
    return [{k: r[k] for k in keys} for r in rows if r["split"] == split]


def bmojo_process(args: list[str], launcher: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, *launcher, "-m", "bmojo.cli", *args]


def subprocess_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("WORLD_SIZE", None)
    return env


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(lr=1e-3, warmup_steps=10, steps=100, min_lr_ratio=0.1)
    lrs = [learning_rate(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))
    assert lrs[-1] == pytest.approx(1e-4, rel=1e-2)
    assert learning_rate(100, cfg) == pytest.approx(1e-4)


def test_training_writes_a_complete_run_directory_and_learns(corpus, tmp_path):
    run = tmp_path / "run"
    assert main(tiny(corpus, run, "--steps", "40", "--eval-every", "20", "--save-every", "20")) == 0
    assert {p.name for p in run.iterdir()} >= {
        "config.json", "train_config.yaml", "tokenizer", "checkpoints", "metrics.jsonl", "loss_curve.png", "sample.txt"
    }  # fmt: skip
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_000020", "step_000040"]
    assert {p.name for p in (run / "checkpoints" / "step_000040").iterdir()} == {
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "training_state.safetensors",
        "training_state.json",
        "checksums.sha256",
    }  # fmt: skip
    assert (run / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "sample.txt").read_text().startswith("def ")
    train, val = records(run, "train"), records(run, "val")
    assert [r["step"] for r in train] == list(range(1, 41))
    assert [r["step"] for r in val] == [0, 20, 40]
    assert all(r["innovation_loss"] is not None and r["loss"] > r["lm_loss"] for r in train)
    assert val[-1]["lm_loss"] < val[0]["lm_loss"] - 1.5  # from ~5.6 (uniform over 264) towards the word salad


def test_eval_and_generate_read_the_run(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(tiny(corpus, run, "--steps", "6", "--set", "train.eval_batches=100")) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--json", "--batch-size", "4", "--threads", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    # The whole validation split both times (eval_batches=100 covers it): the same loss as training's last eval.
    assert result["lm_loss"] == pytest.approx(records(run, "val")[-1]["lm_loss"], abs=1e-6)
    assert result["perplexity"] == pytest.approx(math.exp(result["lm_loss"]))
    assert result["checkpoint"].endswith("step_000006")
    outputs = []
    for _ in range(2):
        assert (
            main(["generate", str(run), "--prompt", "def f", "--max-new-tokens", "12", "--greedy", "--threads", "1"])
            == 0
        )
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0].startswith("def f")


def test_gradient_accumulation_matches_the_full_batch(corpus, tmp_path):
    for name, accum in (("full", "1"), ("accum", "2")):
        assert main(tiny(corpus, tmp_path / name, "--steps", "5", "--grad-accum", accum, "--eval-every", "0")) == 0
    full, accum = records(tmp_path / "full", "train"), records(tmp_path / "accum", "train")
    for a, b in zip(full, accum, strict=True):
        assert a["lm_loss"] == pytest.approx(b["lm_loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_bf16_autocast_trains(corpus, tmp_path):
    assert main(tiny(corpus, tmp_path / "fp32", "--steps", "3", "--eval-every", "0")) == 0
    assert main(tiny(corpus, tmp_path / "bf16", "--steps", "3", "--eval-every", "0", "--bf16")) == 0
    fp32, bf16 = records(tmp_path / "fp32", "train"), records(tmp_path / "bf16", "train")
    for a, b in zip(fp32, bf16, strict=True):
        assert math.isfinite(b["loss"]) and b["lm_loss"] == pytest.approx(a["lm_loss"], abs=0.05)
    assert [r["lm_loss"] for r in fp32] != [r["lm_loss"] for r in bf16]  # bf16 really was on


def test_sigkill_then_resume_reproduces_the_uninterrupted_run(corpus, tmp_path):
    args = ["--steps", "60", "--save-every", "10", "--eval-every", "20", "--seq-len", "64", "--batch-size", "8"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(bmojo_process(tiny(corpus, whole, *args)), env=subprocess_env(), check=True, capture_output=True)

    proc = subprocess.Popen(bmojo_process(tiny(corpus, killed, *args)), env=subprocess_env(), stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        logged = (killed / "metrics.jsonl").read_text() if (killed / "metrics.jsonl").exists() else ""
        if (killed / "checkpoints" / "step_000010").exists() and '"step": 13, "split": "train"' in logged:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    newest = ckpt.list_checkpoints(killed)[-1].name
    assert newest in ("step_000010", "step_000020")
    assert max(r["step"] for r in records(killed, "train")) > int(newest[5:])  # steps past the checkpoint were lost

    resumed = subprocess.run(
        bmojo_process(tiny(corpus, killed, *args, "--resume")), env=subprocess_env(), capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {killed} from {newest}" in resumed.stdout
    assert records(killed, "train") == records(whole, "train")  # every step, bit for bit
    assert records(killed, "val") == records(whole, "val")


def test_two_processes_match_one_at_the_same_global_batch(corpus, tmp_path):
    args = ["--steps", "6", "--batch-size", "8", "--eval-every", "3"]
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    for name, launcher in (("one", ()), ("two", torchrun)):
        done = subprocess.run(
            bmojo_process(tiny(corpus, tmp_path / name, *args), launcher),
            env=subprocess_env(),
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr
    assert "2 process(es) x 1 thread(s)" in done.stdout
    for split in ("train", "val"):
        one, two = records(tmp_path / "one", split), records(tmp_path / "two", split)
        assert [r["step"] for r in one] == [r["step"] for r in two]
        for a, b in zip(one, two, strict=True):
            assert b["lm_loss"] == pytest.approx(a["lm_loss"], abs=1e-5), split


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    code = main(tiny(corpus, run, "--steps", "10", "--save-every", "1", "--lr", "1e30", "--warmup-steps", "0"))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 3
    good = ckpt.list_checkpoints(run)
    assert [p.name for p in good] == ["step_000001"]
    assert err == (
        f"bmojo: error: training diverged at step 2: loss nan, gradient norm nan; stopped, "
        f"the last good checkpoint is {good[0]} (try a lower --lr)"
    )
    model = ckpt.load_model(good[0])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_crash_during_a_save_keeps_the_previous_checkpoint(corpus, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    assert main(tiny(corpus, run, "--steps", "2", "--save-every", "1")) == 0
    before = {p.name: p.read_bytes() for p in (run / "checkpoints" / "step_000002").iterdir()}

    def crash(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt, "save_file", crash)  # dies after the model, before the optimizer state
    capsys.readouterr()
    assert main(tiny(corpus, run, "--steps", "4", "--save-every", "1", "--resume")) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"bmojo: error: cannot save the checkpoint {run / 'checkpoints' / 'step_000003'}: No space left on device"
    )
    assert not list((run / "checkpoints").glob(".tmp-*"))
    assert ckpt.resolve_checkpoint(run).name == "step_000002"
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_000001", "step_000002"]
    assert {p.name: p.read_bytes() for p in (run / "checkpoints" / "step_000002").iterdir()} == before
    monkeypatch.undo()
    # It resumes from there; the run's saved settings apply, so --out is all --resume needs.
    assert main(["train", "--out", str(run), "--resume", "--steps", "4"]) == 0
    assert [r["step"] for r in records(run, "train")] == [1, 2, 3, 4]
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_000003", "step_000004"]
    assert not list((run / "checkpoints").glob(".tmp-*"))


def test_no_pickle_loading_in_the_package():
    src = Path(SRC) / "bmojo"
    for path in src.rglob("*.py"):
        for line in path.read_text().splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{path}: {line.strip()}"
