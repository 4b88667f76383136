"""The `bmojo` command: help, settings precedence, and one clear error line for every kind of bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bmojo.cli import main
from support import cli, one_error_line, repeated_text
from support import train_args as tiny

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return repeated_text(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory) -> Path:
    """A finished two-step run of the tiny preset."""
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(tiny(corpus, out, "--steps", "2")) == 0
    return out


@pytest.mark.parametrize("command", [[], ["train"], ["eval"], ["generate"], ["tokenizer"], ["tokenizer", "train"]])
def test_help(command, capsys):
    assert cli([*command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: bmojo")
    if not command:
        assert all(name in out for name in ("train", "eval", "generate", "tokenizer"))


def test_settings_precedence_preset_file_set_flags(corpus, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "preset": "tiny",
                "model": {"hidden_size": 48, "num_attention_heads": 4, "memory_size": 8},
                "train": {
                    "steps": 1,
                    "lr": "1e-3",
                    "seq_len": 16,
                    "batch_size": 2,
                    "sample_tokens": 4,
                    "threads": 1,
                    "warmup_steps": 1,
                },
            }
        )
    )
    out = tmp_path / "run"
    args = ["train", "--config", str(config), "--data", str(corpus), "--out", str(out), "--set", "model.memory_size=12"]
    assert main([*args, "--set", "train.lr=2e-3", "--lr", "5e-4", "--set", "train.eval_batches=1"]) == 0
    model = json.loads((out / "config.json").read_text())
    assert (model["hidden_size"], model["memory_size"], model["chunk_size"]) == (48, 12, 4)  # file, --set, preset
    assert model["vocab_size"] == 264  # follows the byte tokenizer (260 rounded up to a multiple of 8)
    train = yaml.safe_load((out / "train_config.yaml").read_text())
    assert (train["lr"], train["steps"], train["data"]) == (5e-4, 1, [str(corpus)])  # the flag wins


def test_json_config_file(corpus, tmp_path):
    config = tmp_path / "c.json"
    config.write_text(
        json.dumps({"preset": "tiny", "train": {"steps": 1, "seq_len": 16, "batch_size": 2, "warmup_steps": 1}})
    )
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--data", str(corpus), "--out", str(out), "--threads", "1",
                 "--set", "train.sample_tokens=2", "--set", "train.eval_batches=1"]) == 0  # fmt: skip
    assert yaml.safe_load((out / "train_config.yaml").read_text())["seq_len"] == 16


BAD_TRAIN = [
    (["--data", "/no/such/dir"], "data path '/no/such/dir' does not exist"),
    (["--steps", "-5"], "train.steps must be at least 1, got -5"),
    (["--lr", "0"], "train.lr must be > 0, got 0.0"),
    (
        ["--seq-len", "3"],
        "train.seq_len must be at least model.chunk_size (4): a sequence must hold a whole chunk, got 3",
    ),
    (
        ["--batch-size", "3", "--grad-accum", "2"],
        "train.batch_size must be a multiple of processes x grad_accum (1 x 2), got 3",
    ),
    (["--preset", "huge"], "unknown preset 'huge'; choose one of tiny, cpu, 130m, 370m, 790m, 1.4b"),
    (["--set", "model.colour=3"], "unknown model setting 'colour'; known: "),
    (["--set", "train.colour=3"], "unknown training setting 'colour'; known: "),
    (["--set", "window_size=8"], "--set expects model.NAME=VALUE or train.NAME=VALUE, got 'window_size=8'"),
    (["--set", "train.lr=fast"], "train.lr must be a float, got 'fast'"),
    (
        ["--set", "model.window_size=6"],
        "invalid model configuration: window_size (6) must be a multiple of chunk_size (4)",
    ),
    (["--set", "model.vocab_size=64"], "model.vocab_size (64) is smaller than the tokenizer's vocabulary (260)"),
    (["--device", "tpu"], "train.device must be one of cpu, xla, got 'tpu'"),
    (
        ["--tokenizer", "/no/tok"],
        "tokenizer '/no/tok' not found: give 'byte', a tokenizer.json file or a tokenizer directory",
    ),
    (["--steps", "many"], "argument --steps: invalid int value: 'many' (see `bmojo train --help`)"),
    (["--config", "/no/c.yaml"], "config file '/no/c.yaml' does not exist"),
]


@pytest.mark.parametrize("extra, message", BAD_TRAIN, ids=[m.split(":")[0][:40] for _, m in BAD_TRAIN])
def test_bad_training_input_is_one_error_line(extra, message, corpus, tmp_path, capsys):
    assert cli(tiny(corpus, tmp_path / "run", *extra)) == 2
    error = one_error_line(capsys)
    assert error.startswith(message), error
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_device_xla_without_torch_xla_says_how_to_get_it(corpus, tmp_path, capsys):
    try:
        import torch_xla  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("torch-xla imports here: tests/xla runs --device xla")
    assert cli(tiny(corpus, tmp_path / "run", "--device", "xla")) == 2
    error = one_error_line(capsys)
    assert error.startswith("--device xla needs torch-xla, which does not import here (No module named 'torch_xla')")
    assert "scripts/setup_xla.sh" in error and "neuron/env.sh" in error
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_empty_data_and_too_little_data(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli(tiny(tmp_path / "empty", tmp_path / "run")) == 2
    assert one_error_line(capsys) == f"data folder '{tmp_path / 'empty'}' holds no files matching '*'"
    (tmp_path / "short.txt").write_text("too short")
    assert cli(tiny(tmp_path / "short.txt", tmp_path / "run")) == 2
    assert one_error_line(capsys).endswith(
        "has 10 tokens, too few for seq_len 16: need at least 32 (one training and one validation sequence)"
    )


def test_bad_config_files(corpus, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trian:\n  steps: 3\n")
    assert cli(tiny(corpus, tmp_path / "run", "--config", str(bad))) == 2
    assert one_error_line(capsys) == f"{bad}: expected a mapping with the sections preset, model and train"
    bad.write_text("train: [unclosed\n")
    assert cli(tiny(corpus, tmp_path / "run", "--config", str(bad))) == 2
    assert one_error_line(capsys).startswith(f"{bad}: cannot parse: ")


def test_existing_run_needs_resume_and_resume_needs_a_run(run, corpus, tmp_path, capsys):
    assert cli(tiny(corpus, run, "--steps", "4")) == 2
    assert one_error_line(capsys) == f"{run} already holds a run: pass --resume to continue it, or choose another --out"
    assert cli(tiny(corpus, tmp_path / "fresh", "--resume")) == 2
    assert one_error_line(capsys) == f"--resume: no checkpoint in {tmp_path / 'fresh' / 'checkpoints'} to resume from"


def test_resume_with_an_incompatible_model_is_refused(run, corpus, capsys):
    assert cli(tiny(corpus, run, "--steps", "4", "--resume", "--set", "model.hidden_size=64")) == 2
    assert one_error_line(capsys) == (
        f"{run / 'checkpoints' / 'step_000002'} was trained with a different model configuration "
        "(hidden_size: 32 in the checkpoint, 64 now; head_dim: 8 in the checkpoint, 16 now)"
    )
    assert cli(tiny(corpus, run, "--steps", "4", "--resume", "--preset", "cpu")) == 2
    assert (
        "was trained with a different model configuration (hidden_size: 32 in the checkpoint, 256 now;"
        in one_error_line(capsys)
    )


def test_eval_with_a_tokenizer_too_big_for_the_model(run, corpus, tmp_path, capsys):
    assert (
        cli(["tokenizer", "train", "--data", str(corpus), "--vocab-size", "300", "--out", str(tmp_path / "bpe")]) == 0
    )
    vocab = int(capsys.readouterr().out.split("BPE tokenizer of ")[1].split()[0])
    assert cli(["eval", str(run), "--tokenizer", str(tmp_path / "bpe")]) == 2
    assert one_error_line(capsys) == (
        f"tokenizer '{tmp_path / 'bpe'}' has {vocab} tokens but the model in {run / 'checkpoints' / 'step_000002'} "
        "has vocab_size 264: they do not belong together"
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["eval", "/no/run"],
            "'/no/run' is neither a checkpoint (model.safetensors) nor a run directory with checkpoints",
        ),
        (["generate", "RUN", "--max-new-tokens", "0"], "argument --max-new-tokens: must be at least 1, got 0"),
        (["generate", "RUN", "--temperature", "-1"], "argument --temperature: must be at least 0.0, got -1"),
        (["eval", "RUN", "--seq-len", "2"], "--seq-len must be at least the model's chunk_size (4), got 2"),
        (["eval", "RUN", "--data", "/no/data"], "data path '/no/data' does not exist"),
        (["tokenizer", "inspect", "/no/tok"], "tokenizer '/no/tok' not found"),
        (
            ["tokenizer", "train", "--data", "CORPUS", "--vocab-size", "10", "--out", "OUT"],
            "vocab size must be at least 260",
        ),
        (
            ["tokenizer", "train", "--data", "/no/data", "--vocab-size", "300", "--out", "OUT"],
            "data path '/no/data' does not exist",
        ),
    ],
)
def test_bad_eval_generate_tokenizer_input(argv, message, run, corpus, capsys, tmp_path):
    out = tmp_path / "out"
    swap = {"RUN": str(run), "CORPUS": str(corpus), "OUT": str(out)}
    assert cli([swap.get(a, a) for a in argv]) == 2
    assert one_error_line(capsys).startswith(message)
    assert not out.exists()  # refused before anything was written


def test_checkpoint_with_a_broken_config_is_a_clear_error(run, tmp_path, capsys):
    import shutil

    from bmojo.checkpoint import write_manifest

    broken = tmp_path / "ckpt"
    shutil.copytree(run / "checkpoints" / "step_000002", broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "window_size": 6}))
    write_manifest(broken)  # re-sealed, so the configuration check (not the checksum check) answers
    assert cli(["eval", str(broken), "--data", str(tmp_path)]) == 2
    assert one_error_line(capsys).startswith(f"cannot load the model in {broken}: window_size (6) must be a multiple")


def test_tokenizer_encode_then_train_on_the_bin(corpus, tmp_path, capsys):
    out = tmp_path / "c.bin"
    assert cli(["tokenizer", "encode", "--data", str(corpus), "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"wrote 5,401 tokens (uint16) from 1 file(s) to {out}")
    assert cli(tiny(out, tmp_path / "run", "--steps", "1")) == 0
    assert cli(["tokenizer", "inspect", "byte", "--text", "hi"]) == 0
    assert "vocab size:     260" in capsys.readouterr().out


def test_the_installed_command_prints_one_line_and_exits_2(tmp_path):
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run(
        [sys.executable, "-m", "bmojo.cli", "train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "r")],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr == f"bmojo: error: data path '{tmp_path / 'missing'}' does not exist\n"
