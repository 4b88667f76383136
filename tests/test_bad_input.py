"""Bad input to the `bmojo` command (issue 9, items 4-6 and 10): no code from a data, tokenizer or checkpoint
directory ever runs, and every bad input ends in exactly one line `bmojo: error: ...` and exit status 2, never a
traceback. The commands run in-process through `bmojo.cli.main`."""

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from bmojo.cli import build_parser, main
from bmojo.data import write_token_file
from support import cli, one_error_line, repeated_text
from support import train_args as tiny


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return repeated_text(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory) -> Path:
    """A finished two-step run of the tiny preset with the byte tokenizer."""
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(tiny(corpus, out, "--steps", "2")) == 0
    return out


# ---------------------------------------------------------------------------------------------------------------
# No code from a tokenizer or checkpoint directory runs, even when the user answers "y"
# ---------------------------------------------------------------------------------------------------------------
def plant_code(directory: Path, marker: Path, with_tokenizer_json: bool) -> None:
    """A tokenizer directory whose configuration maps AutoTokenizer/AutoConfig onto its own evil.py, which creates
    ``marker`` when imported."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "evil.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import PreTrainedTokenizerFast\n\n\nclass EvilTokenizer(PreTrainedTokenizerFast):\n"
        "    pass\n\n\nclass EvilConfig:\n    pass\n"
    )
    auto_map = {"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"], "AutoConfig": "evil.EvilConfig"}
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "EvilTokenizer", "auto_map": auto_map})
    )
    (directory / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": auto_map}))
    if with_tokenizer_json:
        from bmojo.tokenization import train_bpe

        train_bpe([b"hello world " * 50], 260).tokenizer.save(str(directory / "tokenizer.json"))


@pytest.mark.parametrize("with_tokenizer_json", [False, True], ids=["auto_map only", "auto_map and tokenizer.json"])
@pytest.mark.parametrize(
    "argv",
    [
        ["tokenizer", "inspect", "TOK"],
        ["tokenizer", "encode", "--data", "CORPUS", "--tokenizer", "TOK", "--out", "OUT/c.bin"],
        ["eval", "RUN", "--tokenizer", "TOK"],
        ["generate", "RUN", "--tokenizer", "TOK", "--max-new-tokens", "2"],
        ["train", "--tokenizer", "TOK", "--steps", "1", "--eval-every", "0"],
    ],
    ids=lambda argv: " ".join(argv[:2]),
)
def test_no_code_from_a_tokenizer_directory_runs(argv, with_tokenizer_json, run, corpus, tmp_path, monkeypatch, capsys):
    marker = tmp_path / "marker"
    plant_code(tmp_path / "tok", marker, with_tokenizer_json)
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n" * 10))  # transformers asks "run the custom code? [y/N]"
    names = {"TOK": str(tmp_path / "tok"), "RUN": str(run), "CORPUS": str(corpus)}
    argv = [names.get(a, a.replace("OUT", str(tmp_path))) for a in argv]
    if argv[0] == "train":
        argv = tiny(corpus, tmp_path / "run", *argv[1:])
    code = cli(argv)
    assert not marker.exists(), "the tokenizer directory's Python code ran"
    if not with_tokenizer_json:  # AutoTokenizer would need the directory's code: refused
        assert code == 2
        assert one_error_line(capsys) == (
            f"cannot load a tokenizer from '{tmp_path / 'tok'}': its auto_map names Python code, which bmojo "
            "never runs; give a directory with a tokenizer.json"
        )
    elif argv[0] in ("tokenizer", "train"):  # loaded from tokenizer.json, without the directory's code
        assert code == 0, capsys.readouterr().err
    else:  # not the run's tokenizer
        assert code == 2
        assert " is not the one " in one_error_line(capsys)


@pytest.mark.parametrize("command", [["eval"], ["generate", "--max-new-tokens", "2"]])
def test_no_code_from_a_checkpoint_directory_runs(command, run, tmp_path, monkeypatch, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    checkpoint = copy / "checkpoints" / "step_000002"
    marker = tmp_path / "marker"
    (checkpoint / "custom_generate").mkdir()
    (checkpoint / "custom_generate" / "generate.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n\n\ndef generate(model, **kwargs):\n"
        "    return None\n"
    )
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n" * 10))
    assert cli([command[0], str(copy), *command[1:]]) == 2
    assert not marker.exists()
    assert one_error_line(capsys) == (
        f"{checkpoint} holds custom_generate/, Python code that bmojo never runs: remove it to load the model"
    )


# ---------------------------------------------------------------------------------------------------------------
# The table: bad input to eval, generate and the tokenizer commands
# ---------------------------------------------------------------------------------------------------------------
def _bad_bin(root: Path) -> Path:
    """A .bin of the byte tokenizer's 260 ids holding one id past the vocabulary."""
    tokens = np.arange(400) % 260
    tokens[123] = 300
    write_token_file(root / "bad.bin", iter([tokens]), vocab_size=260)
    return root / "bad.bin"


def _bin_without_tokens(root: Path) -> Path:
    write_token_file(root / "gone.bin", iter([np.arange(40)]), vocab_size=260)
    (root / "gone.bin").unlink()  # the header stays
    return root / "gone.bin"


def _file(root: Path) -> Path:
    (root / "file.txt").write_text("some text\n")
    return root / "file.txt"


def _bpe_260(root: Path) -> Path:
    """A BPE tokenizer of exactly 260 tokens (256 bytes + 4 specials, as the byte tokenizer) but other ids."""
    assert (
        main(["tokenizer", "train", "--data", str(_file(root)), "--vocab-size", "260", "--out", str(root / "bpe")]) == 0
    )
    return root / "bpe"


# (argv, setup of the placeholders, expected message or its start). Placeholders: RUN, CORPUS, TMP, and the
# names returned by the setup functions (BIN, FILE, TOK).
BAD = [
    (
        ["train", "--data", "BIN", "--out", "TMP/r", "--preset", "tiny", "--seq-len", "16", "--threads", "1"],
        {"BIN": _bad_bin},
        (
            "BIN: holds token id 300 (the first out-of-range one at token 123), but the vocabulary has 260 tokens "
            "(ids 0..259): the file is corrupt or was written for another tokenizer"
        ),
    ),
    (
        ["eval", "RUN", "--data", "BIN"],
        {"BIN": _bad_bin},
        "BIN: holds token id 300 (the first out-of-range one at token 123), but the vocabulary has 260 tokens",
    ),
    (["eval", "RUN", "--data", "BIN"], {"BIN": _bin_without_tokens}, "BIN: not a file (its header gone.bin.json"),
    (
        ["eval", "RUN", "--tokenizer", "TOK"],
        {"TOK": _bpe_260},
        (
            "tokenizer 'TOK' is not the one RUN was trained with (RUN/tokenizer): it turns text into other ids; "
            "leave out --tokenizer"
        ),
    ),
    (
        ["generate", "RUN", "--tokenizer", "TOK"],
        {"TOK": _bpe_260},
        "tokenizer 'TOK' is not the one RUN was trained with",
    ),
    (["generate", "RUN", "--temperature", "inf"], {}, "argument --temperature: must be a finite number, got inf"),
    (["generate", "RUN", "--temperature", "nan"], {}, "argument --temperature: must be a finite number, got nan"),
    (["eval", "RUN", "--tokenizer", "FILE"], {"FILE": _file}, "cannot load a tokenizer from 'FILE': "),
    (["tokenizer", "inspect", "FILE"], {"FILE": _file}, "cannot load a tokenizer from 'FILE': "),
    (["tokenizer", "inspect", "TMP"], {}, "cannot load a tokenizer from 'TMP': "),
    (
        ["tokenizer", "encode", "--data", "FILE", "--out", "FILE"],
        {"FILE": _file},
        "--out must name a .bin file (the data sources read only *.bin as tokens), got 'FILE'",
    ),
    (
        ["tokenizer", "encode", "--data", "TMP", "--out", "TMP/x.bin"],
        {"X": lambda root: (root / "x.bin").write_bytes(b"precious")},
        "--out would overwrite 'TMP/x.bin', which is one of the --data files",
    ),
    (
        ["tokenizer", "encode", "--data", "TMP", "--out", "TMP/y.bin"],
        {"X": lambda root: (root / "y.bin.json").write_text("precious")},
        "--out would overwrite 'TMP/y.bin.json', which is one of the --data files",
    ),
    (
        ["tokenizer", "encode", "--data", "CORPUS", "--out", "TMP/d.bin"],
        {"X": lambda root: (root / "d.bin").mkdir()},
        "--out 'TMP/d.bin' is a directory; give the .bin file to write",
    ),
    (
        ["tokenizer", "encode", "--data", "CORPUS", "--out", "FILE/c.bin"],
        {"FILE": _file},
        "cannot write 'FILE/c.bin': 'FILE' is a file, not a directory",
    ),
    (
        ["tokenizer", "encode", "--data", "TMP/empty.txt", "--out", "TMP/e.bin"],
        {"X": lambda root: (root / "empty.txt").write_text("")},
        "data 'TMP/empty.txt' holds no text (all files are empty)",
    ),
    (
        ["tokenizer", "train", "--data", "CORPUS", "--vocab-size", "300", "--out", "FILE"],
        {"FILE": _file},
        "--out 'FILE' is a file; the tokenizer is written to a directory",
    ),
    (
        ["tokenizer", "train", "--data", "CORPUS", "--vocab-size", "300", "--out", "FILE/tok"],
        {"FILE": _file},
        "cannot write 'FILE/tok/tokenizer.json': 'FILE' is a file, not a directory",
    ),
    (
        ["generate", "RUN", "--threads", "100000"],
        {},
        f"argument --threads: must be at most {os.cpu_count()} (the CPU cores), got 100000",
    ),
    (
        ["tokenizer", "train", "--data", "CORPUS", "--vocab-size", "99999999999999999999", "--out", "TMP/t"],
        {},
        "argument --vocab-size: must be at most 4294967296 (ids are stored as uint32), got 99999999999999999999",
    ),
    (["train", "--step", "3"], {}, "unrecognized arguments: --step 3"),
    (["eval", "RUN", "--batch", "3"], {}, "unrecognized arguments: --batch 3"),
    (["generate", "RUN", "--temp", "0"], {}, "unrecognized arguments: --temp 0"),
    (["tokenizer", "inspect", "byte", "--tex", "x"], {}, "unrecognized arguments: --tex x"),
]


@pytest.mark.parametrize("argv, setup, message", BAD, ids=[" ".join(a[:2]) + ": " + m[:40] for a, _, m in BAD])
def test_bad_input_is_one_error_line(argv, setup, message, run, corpus, tmp_path, capsys):
    names = {"RUN": str(run), "CORPUS": str(corpus), "TMP": str(tmp_path)}
    for name, make in setup.items():
        names[name] = str(make(tmp_path))
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    capsys.readouterr()

    def fill(text: str) -> str:
        for name in sorted(names, key=len, reverse=True):
            text = text.replace(name, names[name])
        return text

    assert cli([fill(a) for a in argv]) == 2
    assert one_error_line(capsys).startswith(fill(message))
    # Nothing the user had was changed, and no temporary files were left behind.
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert not list(tmp_path.rglob(".*tmp*"))


# ---------------------------------------------------------------------------------------------------------------
# Settings: NaN and infinity, warmup longer than the run
# ---------------------------------------------------------------------------------------------------------------
BAD_SETTINGS = [
    (["--set", "model.rope_theta=.nan"], "invalid model configuration: rope_theta must be a finite number, got nan"),
    (["--set", "model.rms_norm_eps=inf"], "invalid model configuration: rms_norm_eps must be a finite number, got inf"),
    (
        ["--set", "model.innovation_loss_weight=nan"],
        "invalid model configuration: innovation_loss_weight must be a finite number, got nan",
    ),
    (["--set", "model.ssm_dt_max=inf"], "invalid model configuration: ssm_dt_max must be a finite number, got inf"),
    (
        ["--set", "model.initializer_range=-.inf"],
        "invalid model configuration: initializer_range must be a finite number, got -inf",
    ),
    (["--set", "model.initializer_range=-1"], "invalid model configuration: initializer_range must be >= 0, got -1.0"),
    (["--set", "train.lr=inf"], "train.lr must be a finite number, got inf"),
    (["--lr", "nan"], "train.lr must be a finite number, got nan"),
    (["--set", "train.weight_decay=inf"], "train.weight_decay must be a finite number, got inf"),
    (["--set", "train.grad_clip=inf"], "train.grad_clip must be a finite number, got inf"),
    (["--set", "train.beta2=nan"], "train.beta2 must be a finite number, got nan"),
    (
        ["--steps", "5", "--warmup-steps", "6"],
        "train.warmup_steps (6) must be at most train.steps (5): lower --warmup-steps or raise --steps",
    ),
]


@pytest.mark.parametrize("extra, message", BAD_SETTINGS, ids=[" ".join(e) for e, _ in BAD_SETTINGS])
def test_non_finite_settings_and_a_long_warmup_are_refused(extra, message, corpus, tmp_path, capsys):
    assert cli(tiny(corpus, tmp_path / "run", *extra)) == 2
    assert one_error_line(capsys) == message
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_data_sources_must_be_text(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"train": {"data": [1, 2]}}))
    assert cli(["train", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    assert one_error_line(capsys) == "train.data must be a list of data sources (paths or 'stdlib'), got [1, 2]"


def test_warmup_as_long_as_the_run_is_accepted(corpus, tmp_path):
    assert cli(tiny(corpus, tmp_path / "run", "--steps", "2", "--warmup-steps", "2", "--eval-every", "0")) == 0


# ---------------------------------------------------------------------------------------------------------------
# The run's own files: absolute data paths; eval --tokenizer only with the run's own tokenizer
# ---------------------------------------------------------------------------------------------------------------
def test_data_paths_are_stored_absolute_so_resume_works_from_elsewhere(corpus, tmp_path, monkeypatch):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "notes").mkdir()
    shutil.copy(corpus / "a.txt", tmp_path / "work" / "notes" / "a.txt")
    monkeypatch.chdir(tmp_path / "work")
    out = tmp_path / "run"
    assert main(tiny("notes", out, "--steps", "2", "--eval-every", "0")) == 0
    saved = yaml.safe_load((out / "train_config.yaml").read_text())
    assert saved["data"] == [str(tmp_path / "work" / "notes")]
    monkeypatch.chdir(tmp_path)  # elsewhere: the relative path "notes" means nothing here
    assert main(["train", "--out", str(out), "--resume", "--steps", "3"]) == 0
    assert (out / "checkpoints" / "step_000003").is_dir()
    assert cli(["eval", str(out)]) == 0  # the run's own data, found from here too


def test_eval_accepts_the_runs_own_tokenizer_under_any_name(run, tmp_path, capsys):
    capsys.readouterr()
    assert cli(["eval", str(run), "--json"]) == 0
    own = json.loads(capsys.readouterr().out)
    shutil.copytree(run / "tokenizer", tmp_path / "copy")
    for spec in ("byte", str(run / "tokenizer"), str(tmp_path / "copy")):
        assert cli(["eval", str(run), "--tokenizer", spec, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["lm_loss"] == own["lm_loss"]


# ---------------------------------------------------------------------------------------------------------------
# --help of eval and generate states every default
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["eval", "generate"])
def test_eval_and_generate_help_show_every_default(command):
    [subparsers] = [a for a in build_parser()._actions if a.dest == "command"]
    parser = subparsers.choices[command]
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(options) >= 7
    for action in options:
        text = action.help % vars(action) if action.help else ""
        assert "(default: " in text, f"{command} {action.option_strings[0]}: {text!r}"
        if action.default not in (None, False, ""):
            assert f"(default: {action.default}" in text, f"{command} {action.option_strings[0]}: {text!r}"
    rendered = " ".join(parser.format_help().split())
    assert rendered.count("(default: ") >= len(options)


def test_text_that_is_not_utf8_on_the_command_line(capsys):
    # Python decodes argv with surrogateescape: b"\xff" arrives as "\udcff"; the byte tokenizer encodes the byte.
    assert cli(["tokenizer", "inspect", "byte", "--text", "a\udcff"]) == 0
    assert "ids:          [101, 259]" in capsys.readouterr().out
