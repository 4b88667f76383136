"""The run directory is safe: one run at a time, signals save, records before checkpoints, --resume refuses
changed settings, the run file reproduces the run, checkpoints are verified, and every fault is one error line."""

import errno
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from filelock import FileLock

from bmojo import checkpoint as ckpt
from bmojo.cli import main
from bmojo.run_directory import LOCK_FILE
from bmojo.settings import TrainConfig
from bmojo.training import learning_rate
from support import Killed, die_after_saving, word_salad

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return word_salad(tmp_path_factory.mktemp("corpus"))


def tiny(corpus: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--preset", "tiny", "--data", str(corpus), "--out", str(out), "--seq-len", "32", "--batch-size", "4",
        "--threads", "1", "--lr", "3e-3", "--warmup-steps", "2",
        "--set", "train.eval_batches=2", "--set", "train.sample_tokens=8", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def finished(corpus, tmp_path_factory) -> Path:
    """A finished 2-step run with one checkpoint (copy it before changing it)."""
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(tiny(corpus, out, "--steps", "2")) == 0
    return out


def copy_run(run: Path, tmp_path: Path) -> Path:
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def records(run: Path, split: str) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split]


def losses(run: Path) -> list[tuple]:
    return [(r["step"], r["loss"], r["lm_loss"], r["grad_norm"], r["lr"]) for r in records(run, "train")]


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("bmojo: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("bmojo: error: ")
    return lines[0][len("bmojo: error: ") :]


def process(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "bmojo.cli", *args]


def subprocess_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("WORLD_SIZE", None)
    return env


def wait_for_step(run: Path, proc: subprocess.Popen, step: int) -> None:
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        logged = (run / "metrics.jsonl").read_text() if (run / "metrics.jsonl").exists() else ""
        if f'"step": {step}, "split": "train"' in logged:
            return
        time.sleep(0.01)
    raise AssertionError(f"step {step} never came (exit status {proc.poll()})")


# ---------------------------------------------------------------------------------------------------------------
# One run at a time
# ---------------------------------------------------------------------------------------------------------------
def test_a_second_run_on_a_busy_directory_gets_one_line_and_writes_nothing(corpus, finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    before = snapshot(run)
    with FileLock(run / LOCK_FILE, timeout=0):  # what a running `bmojo train --out run` holds
        assert main(tiny(corpus, run, "--steps", "4", "--resume")) == 2
        assert error_line(capsys) == f"{run} is in use by another run (lock {run / LOCK_FILE})"
        assert snapshot(run) == before
        assert main(["eval", str(run), "--threads", "1", "--max-batches", "1"]) == 0  # reading needs no lock
    assert main(tiny(corpus, run, "--steps", "3", "--resume")) == 0  # free again


def test_two_training_processes_on_one_directory(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    first = subprocess.Popen(process(tiny(corpus, run, "--steps", "400")), env=subprocess_env(), stderr=subprocess.PIPE)
    try:
        wait_for_step(run, first, 2)
        assert main(tiny(corpus, run, "--steps", "400")) == 2
        assert error_line(capsys) == f"{run} is in use by another run (lock {run / LOCK_FILE})"
    finally:
        first.kill()
        first.wait()
    steps = [r["step"] for r in records(run, "train")]
    assert steps == list(range(1, len(steps) + 1))  # one run's records only
    assert [r["step"] for r in records(run, "val")] == [0]


# ---------------------------------------------------------------------------------------------------------------
# Signals
# ---------------------------------------------------------------------------------------------------------------
SIGNAL_RUN = ["--steps", "50", "--save-every", "20", "--eval-every", "10"]


@pytest.fixture(scope="module")
def whole(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("whole") / "run"
    assert main(tiny(corpus, out, *SIGNAL_RUN)) == 0
    return out


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_at_the_step_boundary_and_resume_continues_exactly(signum, corpus, whole, tmp_path):
    """The signal goes to a training subprocess; the uninterrupted run and the resumption run in this one."""
    run = tmp_path / "run"
    proc = subprocess.Popen(
        process(tiny(corpus, run, *SIGNAL_RUN)), env=subprocess_env(), stderr=subprocess.PIPE, text=True
    )
    wait_for_step(run, proc, 3)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    stopped = max(r["step"] for r in records(run, "train"))
    assert 3 <= stopped < 50
    newest = ckpt.list_checkpoints(run)[-1]
    assert newest.name == f"step_{stopped:06d}"  # the step in flight was finished, then saved
    assert err.splitlines()[-1] == (
        f"bmojo: error: stopped by {signal.Signals(signum).name} after step {stopped}: saved {newest}; "
        "continue with --resume"
    )
    assert main(tiny(corpus, run, *SIGNAL_RUN, "--resume")) == 0
    assert losses(run) == losses(whole)  # bit for bit
    assert [(r["step"], r["lm_loss"]) for r in records(run, "val")] == [
        (r["step"], r["lm_loss"]) for r in records(whole, "val")
    ]
    assert (run / "sample.txt").read_text() == (whole / "sample.txt").read_text()


# ---------------------------------------------------------------------------------------------------------------
# A checkpoint's step has its records
# ---------------------------------------------------------------------------------------------------------------
def test_records_are_complete_whenever_the_checkpoint_exists(corpus, tmp_path, monkeypatch):
    run = tmp_path / "run"
    die_after_saving(monkeypatch, ckpt, 4)
    with pytest.raises(Killed):
        main(tiny(corpus, run, "--steps", "6", "--save-every", "2", "--eval-every", "4"))
    assert ckpt.list_checkpoints(run)[-1].name == "step_000004"
    assert [r["step"] for r in records(run, "train")] == [1, 2, 3, 4]
    assert [r["step"] for r in records(run, "val")] == [0, 4]
    monkeypatch.undo()
    assert main(tiny(corpus, run, "--steps", "6", "--save-every", "2", "--eval-every", "4", "--resume")) == 0
    assert [r["step"] for r in records(run, "train")] == [1, 2, 3, 4, 5, 6]  # no duplicates
    assert [r["step"] for r in records(run, "val")] == [0, 4, 6]


def test_resume_after_the_last_checkpoint_finishes_the_run(corpus, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    die_after_saving(monkeypatch, ckpt, 3)
    with pytest.raises(Killed):
        main(tiny(corpus, run, "--steps", "3"))
    assert not (run / "sample.txt").exists()
    assert [r["step"] for r in records(run, "val")] == [0, 3]
    monkeypatch.undo()
    capsys.readouterr()
    assert main(tiny(corpus, run, "--steps", "3", "--resume")) == 0
    assert (run / "sample.txt").read_text().startswith("def ")
    assert (run / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [r["step"] for r in records(run, "train")] == [1, 2, 3]
    assert main(tiny(corpus, run, "--steps", "3", "--resume")) == 0
    assert "already finished 3 of 3 steps; nothing to do" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------
# --resume and changed settings
# ---------------------------------------------------------------------------------------------------------------
def test_resume_refuses_changed_settings_and_lists_them(corpus, finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    before = snapshot(run)
    changed = ("--lr", "1e-3", "--seed", "1", "--batch-size", "8")
    assert main(tiny(corpus, run, "--steps", "4", "--resume", *changed)) == 2
    assert error_line(capsys) == (
        f"--resume: {run} was started with other settings (batch_size: 4 -> 8; lr: 0.003 -> 0.001; seed: 0 -> 1); "
        "pass --allow-changes to continue with the new ones"
    )
    assert snapshot(run) == before
    # Steps, evaluation, checkpoint and thread settings may change.
    assert main(tiny(corpus, run, "--steps", "3", "--resume", "--eval-every", "1", "--save-every", "1")) == 0


def test_more_steps_keep_the_schedule_and_allowed_changes_keep_the_token_count(corpus, tmp_path):
    run = tmp_path / "run"
    assert main(tiny(corpus, run, "--steps", "10", "--eval-every", "0")) == 0
    assert main(tiny(corpus, run, "--steps", "16", "--eval-every", "0", "--resume")) == 0
    lrs = [r["lr"] for r in records(run, "train")]
    original = TrainConfig(lr=3e-3, warmup_steps=2, steps=10)
    assert lrs == pytest.approx([learning_rate(s, original) for s in range(16)], rel=1e-12)
    assert lrs[10:] == pytest.approx([3e-4] * 6)  # the floor: no jump at the resume point
    assert all(a >= b for a, b in itertools.pairwise(lrs[1:]))
    assert yaml.safe_load((run / "train_config.yaml").read_text())["decay_steps"] == 10

    changed = ("--steps", "20", "--eval-every", "0", "--batch-size", "2", "--resume", "--allow-changes")
    assert main(tiny(corpus, run, *changed)) == 0
    tokens = [r["tokens"] for r in records(run, "train")]
    assert tokens == [4 * 32 * s for s in range(1, 17)] + [16 * 4 * 32 + 2 * 32 * s for s in range(1, 5)]
    assert [r["lr"] for r in records(run, "train")][16:] == pytest.approx([3e-4] * 4)


def test_the_runs_own_settings_file_reproduces_it(corpus, tmp_path):
    first, again = tmp_path / "first", tmp_path / "again"
    assert main(tiny(corpus, first, "--steps", "3", "--set", "model.memory_size=8")) == 0
    assert main(["train", "--config", str(first / "train_config.yaml"), "--out", str(again)]) == 0
    assert json.loads((again / "config.json").read_text()) == json.loads((first / "config.json").read_text())
    assert losses(again) == losses(first)
    saved = yaml.safe_load((again / "train_config.yaml").read_text())
    assert (saved["preset"], saved["model"], saved["out"]) == ("tiny", {"memory_size": 8}, str(again))


# ---------------------------------------------------------------------------------------------------------------
# Checksums
# ---------------------------------------------------------------------------------------------------------------
def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # in the tensor data, past the header
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.fixture(scope="module")
def two_checkpoints(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(tiny(corpus, out, "--steps", "4", "--save-every", "2", "--eval-every", "0")) == 0
    return out


@pytest.mark.parametrize(
    "damage, name",
    [(flip_byte, "model.safetensors"), (truncate, "training_state.safetensors")],
)
def test_a_damaged_newest_checkpoint_is_named_and_resume_falls_back(damage, name, two_checkpoints, tmp_path, capsys):
    run = copy_run(two_checkpoints, tmp_path)
    newest = run / "checkpoints" / "step_000004"
    damage(newest / name)
    problem = f"checkpoint {newest} is damaged: {name} does not match its checksum in checksums.sha256"
    for command in (["eval", str(run), "--max-batches", "1"], ["generate", str(run), "--max-new-tokens", "2"]):
        assert main([*command, "--threads", "1"]) == 2
        assert error_line(capsys) == problem
    assert main(["train", "--out", str(run), "--resume", "--steps", "5"]) == 0
    out, err = capsys.readouterr()
    assert err.splitlines()[0] == f"bmojo: warning: {problem}; falling back to the previous checkpoint"
    assert f"resuming {run} from step_000002" in out
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_000004", "step_000005"]
    assert (run / "checkpoints" / "step_000004.damaged" / name).is_file()  # kept for inspection
    assert [r["step"] for r in records(run, "train")] == [1, 2, 3, 4, 5]


def test_with_no_intact_checkpoint_resume_names_the_newest(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    flip_byte(run / "checkpoints" / "step_000002" / "model.safetensors")
    assert main(["train", "--out", str(run), "--resume", "--steps", "3"]) == 2
    assert error_line(capsys) == (
        f"checkpoint {run / 'checkpoints' / 'step_000002'} is damaged: model.safetensors does not match its checksum "
        "in checksums.sha256"
    )


def test_with_every_checkpoint_damaged_resume_names_the_newest(two_checkpoints, tmp_path, capsys):
    run = copy_run(two_checkpoints, tmp_path)
    for checkpoint in ckpt.list_checkpoints(run):
        flip_byte(checkpoint / "model.safetensors")
    assert main(["train", "--out", str(run), "--resume", "--steps", "5"]) == 2
    err = capsys.readouterr().err.splitlines()
    newest = run / "checkpoints" / "step_000004"
    assert err[-1] == f"bmojo: error: checkpoint {newest} is damaged; no earlier one is intact"
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_000002", "step_000004"]  # nothing renamed


# ---------------------------------------------------------------------------------------------------------------
# Faults of --out and of checkpoints: one line, exit 2, nothing left behind
# ---------------------------------------------------------------------------------------------------------------
def out_is_a_file(tmp_path: Path) -> tuple[Path, str]:
    (tmp_path / "f").write_text("x")
    return tmp_path / "f", f"--out {tmp_path / 'f'} exists and is not a directory"


def out_under_a_file(tmp_path: Path) -> tuple[Path, str]:
    (tmp_path / "f").write_text("x")
    return tmp_path / "f" / "run", f"cannot use --out {tmp_path / 'f' / 'run'}: Not a directory"


def out_too_long(tmp_path: Path) -> tuple[Path, str]:
    return tmp_path / ("x" * 300), f"cannot use --out {tmp_path / ('x' * 300)}: File name too long"


def out_read_only(tmp_path: Path) -> tuple[Path, str]:
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only directories")
    (tmp_path / "ro").mkdir(mode=0o500)
    return tmp_path / "ro", f"cannot use --out {tmp_path / 'ro'}: Permission denied"


@pytest.mark.parametrize("fault", [out_is_a_file, out_under_a_file, out_too_long, out_read_only])
def test_unusable_out(fault, corpus, tmp_path, capsys):
    out, message = fault(tmp_path)
    before = snapshot(tmp_path)
    assert main(tiny(corpus, out, "--steps", "2")) == 2
    assert error_line(capsys) == message
    assert snapshot(tmp_path) == before


def test_a_full_disk_while_writing_records_is_one_line(corpus, tmp_path, monkeypatch, capsys):
    from bmojo.run_directory import MetricsLog

    def full(self, record):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(MetricsLog, "append", full)
    assert main(tiny(corpus, tmp_path / "run", "--steps", "2")) == 2
    assert error_line(capsys) == f"cannot write into {tmp_path / 'run'}: No space left on device"


def reseal(checkpoint: Path) -> None:
    """Rewrite the checksums, so that the file's contents (not its checksum) are what is checked."""
    ckpt.write_manifest(checkpoint)


def edit_json(name: str, change):
    def edit(checkpoint: Path) -> None:
        path = checkpoint / name
        path.write_text(json.dumps(change(json.loads(path.read_text()))))

    return edit


def remove(name: str):
    return lambda checkpoint: (checkpoint / name).unlink()


def overwrite(name: str, text: str):
    return lambda checkpoint: (checkpoint / name).write_text(text)


CHECKPOINT_FAULTS = {
    "truncated training state": (
        lambda c: truncate(c / "training_state.safetensors"), False, "cannot read the training state in {c}: "
    ),
    "broken training_state.json": (
        overwrite("training_state.json", '{"step": 2,'), False, "cannot read the training state in {c}: "
    ),
    "missing training_state.json": (remove("training_state.json"), False, "checkpoint {c} has no training_state.json"),
    "training_state.json of wrong types": (
        edit_json("training_state.json", lambda s: {**s, "step": "2"}),
        False,
        "{c}/training_state.json is malformed: expected an object with integer step and tokens",
    ),
    "config.json not an object": (
        overwrite("config.json", "[1, 2]"), True, "in {c}: config.json is not a JSON object"
    ),
    "config.json of wrong types": (
        edit_json("config.json", lambda s: {**s, "hidden_size": "32"}),
        True,
        "in {c}: hidden_size must be an integer, got '32'",
    ),
    "config.json against the weights": (
        edit_json("config.json", lambda s: {**s, "intermediate_size": 72}),
        True,
        (
            "cannot load the model in {c}: model.layers.0.mlp.down_proj.weight has shape [32, 64] in "
            "model.safetensors but config.json implies [32, 72]"
        ),
    ),
}  # fmt: skip


@pytest.mark.parametrize("fault", CHECKPOINT_FAULTS)
def test_faulty_checkpoint_files(fault, finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    checkpoint = run / "checkpoints" / "step_000002"
    change, model_fault, message = CHECKPOINT_FAULTS[fault]
    change(checkpoint)
    reseal(checkpoint)
    commands = [["train", "--out", str(run), "--resume", "--steps", "3"]]
    if model_fault:
        commands.append(["eval", str(run), "--threads", "1"])
    for command in commands:
        assert main(command) == 2, command
        line = error_line(capsys)
        assert message.format(c=checkpoint) in line and checkpoint.name in line, command
    assert not list(run.rglob(".tmp-*"))
    assert [r["step"] for r in records(run, "train")] == [1, 2]


# ---------------------------------------------------------------------------------------------------------------
# The progress bar in a log file
# ---------------------------------------------------------------------------------------------------------------
def test_the_progress_bar_does_not_write_every_step_into_a_file(corpus, tmp_path, capsys):
    assert main(tiny(corpus, tmp_path / "run", "--steps", "40", "--eval-every", "0")) == 0
    err = capsys.readouterr().err
    frames = [f for f in err.replace("\r", "\n").splitlines() if "step/s" in f or "?step" in f]
    assert 1 <= len(frames) <= 3, frames  # the start, the end (and one every 30 s)
