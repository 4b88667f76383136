"""`bmojo --help` and argument errors answer at once: the command's entry point imports neither torch nor
transformers before it has parsed the arguments, and a command still sees the package as `import bmojo` makes it."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = str(ROOT / "src")
# What the `bmojo` console script runs (pip writes exactly this call of the [project.scripts] target).
BMOJO = [sys.executable, "-c", "import sys, bmojo_cli; sys.exit(bmojo_cli.main())"]


def env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))


def test_console_script_is_the_light_entry_point():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"bmojo": "bmojo_cli:main"}


@pytest.mark.parametrize(
    ("args", "status", "stream", "start"),
    [
        (["--help"], 0, "stdout", "usage: bmojo"),
        (["train", "--help"], 0, "stdout", "usage: bmojo train"),
        (["train", "--no-such-flag"], 2, "stderr", "bmojo: error: unrecognized arguments: --no-such-flag"),
    ],
)
def test_help_and_argument_errors_answer_within_a_second(args, status, stream, start):
    # The best of three runs: other jobs on this machine add noise, never speed.
    times = []
    for _ in range(3):
        began = time.perf_counter()
        result = subprocess.run([*BMOJO, *args], env=env(), capture_output=True, text=True, timeout=60)
        times.append(time.perf_counter() - began)
        assert result.returncode == status, result.stderr
        assert getattr(result, stream).startswith(start)
        if times[-1] < 1.0:
            break
    print(f"bmojo {' '.join(args)}: {min(times):.2f} s (runs: {', '.join(f'{t:.2f}' for t in times)})")
    assert min(times) < 1.0


def test_parsing_imports_neither_torch_nor_transformers():
    probe = (
        "import sys, bmojo_cli\n"
        "for argv in (['--help'], ['train', '--help'], ['eval', '--help'], ['train', '--steps', 'x']):\n"
        "    try:\n"
        "        bmojo_cli.main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))\n"
        "print('bmojo' in sys.modules)\n"  # no half-made package left behind
        "import bmojo\n"
        "print(bmojo.BMojoForCausalLM.__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], env=env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-3:] == ["[]", "False", "BMojoForCausalLM"]


def test_a_command_sees_the_whole_package_and_a_passive_wait_policy():
    probe = (
        "import os, sys, bmojo_cli\n"
        "status = bmojo_cli.main(['tokenizer', 'inspect', 'byte'])\n"
        "import bmojo\n"
        "from transformers import AutoConfig\n"
        "config = AutoConfig.for_model('bmojo')\n"
        "print(status, bmojo.__version__, type(config).__name__, os.environ['OMP_WAIT_POLICY'])\n"
    )
    environment = env()
    environment.pop("OMP_WAIT_POLICY", None)
    result = subprocess.run([sys.executable, "-c", probe], env=environment, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "0 0.1.0 BMojoConfig PASSIVE"


def test_a_wait_policy_the_user_chose_stays(monkeypatch):
    from bmojo.cli import set_thread_environment

    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    set_thread_environment()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_training_settings_module_matches_the_data_default():
    from bmojo.data import STDLIB
    from bmojo.settings import TrainConfig

    assert TrainConfig().data == [STDLIB]
