"""The trn1 job material in neuron/, checked on a machine without Trainium.

* Launch scripts (bash): --help needs no environment; bad arguments fail with one line (exit 2) before the
  environment is checked; --dry-run prints the exact torchrun / neuron_parallel_compile command; without the
  Neuron SDK the environment check fails with fixed one-line messages (exit 3) instead of a traceback.
* neuron/check_env.py (bmojo.trn1.environment) and neuron/env.sh.
* The inference export: the flatten/unflatten of the decoding cache, the prefill/decode wrappers against the
  model, and ``torch.jit.trace`` of both wrappers (the CPU stand-in for ``torch_neuronx.trace``, which needs
  the Neuron SDK and has not been run) reproducing the eager logits over many decode steps.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from bmojo import BMojoForCausalLM, preset_config
from bmojo.trn1 import environment as check_env
from bmojo.trn1 import inference_graphs as ig

ROOT = Path(__file__).resolve().parents[1]
NEURON = ROOT / "neuron"


def _load_script(path: Path):
    """A script of neuron/ as a module (its ``main`` is called in-process), without putting neuron/ on sys.path."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


export_inference = _load_script(NEURON / "export_inference.py")

ON_TRN1 = importlib.util.find_spec("torch_neuronx") is not None
off_trn1 = pytest.mark.skipif(ON_TRN1, reason="checks the messages of a machine without the Neuron SDK")


def _env():
    """This venv's python/torchrun first on PATH (as an activated venv would be), bmojo importable."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), "/usr/bin", "/bin"])
    env["PYTHONPATH"] = str(ROOT / "src")
    env.pop("PJRT_DEVICE", None)
    return env


def run(*args, env=None):
    script = args[0]
    cmd = (
        ["bash", str(NEURON / script), *args[1:]]
        if script.endswith(".sh")
        else [sys.executable, str(NEURON / script), *args[1:]]
    )
    return subprocess.run(cmd, capture_output=True, text=True, env=env or _env(), cwd=ROOT, timeout=60)


LAUNCHERS = ["train_trn1_2xlarge.sh", "train_trn1_32xlarge.sh", "precompile.sh"]


# ---------------------------------------------------------------------------------------------------------------
# Launch scripts
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script", LAUNCHERS)
def test_help_exits_0_without_checking_the_environment(script):
    # Only the system's directories on PATH: a script that checked the environment would fail (exit 3).
    result = run(script, "--help", env={"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/")})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"Usage: {script} ")
    assert "--dry-run" in result.stdout and result.stderr == ""


def test_export_help_needs_neither_torch_nor_neuron():
    result = subprocess.run(
        [sys.executable, "-S", str(NEURON / "export_inference.py"), "--help"],  # -S: no site-packages, so no torch
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: export_inference.py ") and "--cpu-trace" in result.stdout


def test_dry_run_trn1_2xlarge():
    result = run(
        "train_trn1_2xlarge.sh", "--dry-run", "--", "--preset", "tiny", "--data", "my corpus.txt", "--steps", "5"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        "torchrun --nproc_per_node=2 -m bmojo.cli train --device xla --bf16 "
        "--preset tiny --data my\\ corpus.txt --steps 5\n"
    )


def test_dry_run_trn1_32xlarge_single_and_multi_node():
    single = run("train_trn1_32xlarge.sh", "--dry-run", "--", "--config", "run.yaml", "--resume")
    assert single.returncode == 0, single.stderr
    assert (
        single.stdout
        == "torchrun --nproc_per_node=32 -m bmojo.cli train --device xla --bf16 --config run.yaml --resume\n"
    )

    multi = run(
        "train_trn1_32xlarge.sh",
        "--nnodes",
        "4",
        "--node-rank=3",
        "--master-addr",
        "10.0.0.1",
        "--master-port",
        "1234",
        "--dry-run",
        "--fp32",
        "--",
        "--batch-size=64",
    )
    assert multi.returncode == 0, multi.stderr
    assert multi.stdout == (
        "torchrun --nproc_per_node=32 --nnodes=4 --node_rank=3 --master_addr=10.0.0.1 --master_port=1234 "
        "-m bmojo.cli train --device xla --batch-size=64\n"
    )
    # One node: no multi-node flags, whatever the default port.
    one = run("train_trn1_32xlarge.sh", "--nnodes", "1", "--dry-run")
    assert one.stdout == "torchrun --nproc_per_node=32 -m bmojo.cli train --device xla --bf16\n"


def test_dry_run_precompile_wraps_the_same_command():
    result = run(
        "precompile.sh",
        "--instance",
        "trn1.32xlarge",
        "--nnodes",
        "2",
        "--node-rank",
        "0",
        "--master-addr",
        "head",
        "--trial-steps",
        "3",
        "--dry-run",
        "--",
        "--preset",
        "130m",
        "--steps",
        "1000",
        "--out",
        "runs/x",
    )
    assert result.returncode == 0, result.stderr
    words = result.stdout.split()
    tmp = os.environ.get("TMPDIR", "/tmp")
    assert words == [
        "neuron_parallel_compile",
        "torchrun",
        "--nproc_per_node=32",
        "--nnodes=2",
        "--node_rank=0",
        "--master_addr=head",
        "--master_port=29500",
        "-m",
        "bmojo.cli",
        "train",
        "--device",
        "xla",
        "--bf16",
        "--preset",
        "130m",
        "--steps",
        "1000",
        "--out",
        "runs/x",
        "--steps",
        "3",
        "--warmup-steps",
        "0",
        "--out",
        f"{tmp}/bmojo-precompile.XXXXXX",
    ]
    small = run("precompile.sh", "--instance=trn1.2xlarge", "--dry-run")
    assert small.stdout.startswith("neuron_parallel_compile torchrun --nproc_per_node=2 -m bmojo.cli train ")
    assert " --steps 10 --warmup-steps 0 --out " in small.stdout


def test_dry_run_passes_tp_and_zero1_to_bmojo_train():
    big = run("train_trn1_32xlarge.sh", "--tp", "8", "--zero1", "--dry-run", "--", "--preset", "1.4b")
    assert big.returncode == 0, big.stderr
    assert (
        big.stdout
        == "torchrun --nproc_per_node=32 -m bmojo.cli train --device xla --bf16 --tp 8 --zero1 --preset 1.4b\n"
    )
    small = run("train_trn1_2xlarge.sh", "--tp=2", "--dry-run")
    assert small.stdout == "torchrun --nproc_per_node=2 -m bmojo.cli train --device xla --bf16 --tp 2\n"
    compiled = run("precompile.sh", "--instance", "trn1.32xlarge", "--zero1", "--tp", "4", "--dry-run")
    assert compiled.stdout.startswith(
        "neuron_parallel_compile torchrun --nproc_per_node=32 -m bmojo.cli train --device xla --bf16 --tp 4 --zero1 "
    )
    assert run("train_trn1_2xlarge.sh", "--tp", "1", "--dry-run").stdout == (
        "torchrun --nproc_per_node=2 -m bmojo.cli train --device xla --bf16\n"
    )


BAD_ARGUMENTS = [
    ("train_trn1_32xlarge.sh", ["--tp", "3"], "--tp must divide the 32 NeuronCores of a node, got 3"),
    ("train_trn1_32xlarge.sh", ["--tp", "64"], "--tp must be at most 32, got 64"),
    ("train_trn1_2xlarge.sh", ["--tp", "0"], "--tp must be at least 1, got 0"),
    ("precompile.sh", ["--instance", "trn1.2xlarge", "--tp", "two"], "--tp expects an integer, got 'two'"),
    (
        "train_trn1_32xlarge.sh",
        ["--nnodes", "2", "--node-rank", "2", "--master-addr", "h"],
        "--node-rank must be less than --nnodes (2), got 2",
    ),
    ("train_trn1_32xlarge.sh", ["--nnodes", "two"], "--nnodes expects an integer, got 'two'"),
    (
        "train_trn1_32xlarge.sh",
        ["--nnodes", "2", "--node-rank", "1.5", "--master-addr", "h"],
        "--node-rank expects an integer, got '1.5'",
    ),
    (
        "train_trn1_32xlarge.sh",
        ["--nnodes", "2", "--node-rank", "1"],
        "--master-addr is required when --nnodes is more than 1 (the address of node 0)",
    ),
    (
        "train_trn1_32xlarge.sh",
        ["--nnodes", "2", "--master-addr", "h"],
        "--node-rank is required when --nnodes is more than 1 (0 on the first node)",
    ),
    ("train_trn1_32xlarge.sh", ["--nnodes", "0"], "--nnodes must be at least 1, got 0"),
    ("train_trn1_32xlarge.sh", ["--master-port", "70000"], "--master-port must be at most 65535, got 70000"),
    (
        "train_trn1_32xlarge.sh",
        ["--node_rank", "1"],
        "unknown option '--node_rank' (bmojo train arguments go after --)",
    ),
    ("train_trn1_32xlarge.sh", ["--preset", "tiny"], "unknown option '--preset' (bmojo train arguments go after --)"),
    ("train_trn1_32xlarge.sh", ["--nnodes"], "--nnodes needs a value"),
    ("train_trn1_2xlarge.sh", ["--", "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    ("train_trn1_2xlarge.sh", ["--", "--steps=abc"], "--steps expects an integer, got 'abc'"),
    (
        "train_trn1_2xlarge.sh",
        ["--nnodes", "2", "--node-rank", "0", "--master-addr", "h"],
        "multi-node training needs trn1.32xlarge (EFA is not available on trn1.2xlarge); use train_trn1_32xlarge.sh",
    ),
    (
        "precompile.sh",
        [],
        "--instance is required (trn1.2xlarge or trn1.32xlarge): the graphs depend on the number of processes",
    ),
    (
        "precompile.sh",
        ["--instance", "trn1.8xlarge"],
        "--instance must be trn1.2xlarge or trn1.32xlarge, got 'trn1.8xlarge'",
    ),
    ("precompile.sh", ["--instance", "trn1.2xlarge", "--trial-steps", "0"], "--trial-steps must be at least 1, got 0"),
    (
        "precompile.sh",
        ["--instance", "trn1.2xlarge", "--", "--resume"],
        "leave out --resume: pre-compile with the arguments of a fresh run",
    ),
]


@pytest.mark.parametrize("script,args,message", BAD_ARGUMENTS, ids=[" ".join([a[0], *a[1][:3]]) for a in BAD_ARGUMENTS])
def test_bad_arguments_fail_with_one_line_before_the_environment_check(script, args, message):
    result = run(script, *args)  # no --dry-run: the environment check would run next, and must not
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == f"{script}: error: {message} (see {script} --help)\n"


def _expected_environment_lines(purpose: str) -> list[str]:
    """What check_env must say in this venv (torch 2.13, no Neuron packages, no devices)."""
    lines = []
    torch_version = importlib.metadata.version("torch")
    if not torch_version.startswith("2.9"):
        lines.append(check_env.MSG["torch_version"].format(found=torch_version))
    if importlib.util.find_spec("torch_xla") is None:
        lines.append(
            "torch-xla is not installed: run this on a trn1 instance with the Neuron SDK 2.28 PyTorch environment"
        )
    lines.append(
        "torch-neuronx is not installed: run this on a trn1 instance with the Neuron SDK 2.28 PyTorch environment"
    )
    lines.append(
        "neuronx-cc is not on PATH: the Neuron compiler comes with the Neuron SDK 2.28 PyTorch environment; "
        "activate the Neuron SDK 2.28 PyTorch 2.9 environment (source /opt/aws_neuronx_venv_pytorch_2_9/bin/activate)"
    )
    if purpose == "compile":
        lines.append(
            "neuron_parallel_compile is not on PATH: it comes with torch-neuronx; activate the Neuron SDK 2.28 "
            "PyTorch 2.9 environment (source /opt/aws_neuronx_venv_pytorch_2_9/bin/activate)"
        )
    lines.append(
        "no Neuron devices found (/dev/neuron*): run this on a trn1 instance with the Neuron SDK 2.28 PyTorch "
        "environment (the Neuron driver must be loaded: neuron-ls)"
    )
    summary = f"environment not ready for {purpose} ({len(lines)} problem(s) above); see neuron/README.md"
    return [f"bmojo-neuron: {line}" for line in lines + [summary]]


@off_trn1
@pytest.mark.parametrize(
    "args,purpose",
    [
        (["train_trn1_2xlarge.sh", "--", "--preset", "tiny"], "train"),
        (["train_trn1_32xlarge.sh", "--nnodes", "2", "--node-rank", "1", "--master-addr", "h"], "train"),
        (["precompile.sh", "--instance", "trn1.32xlarge"], "compile"),
    ],
)
def test_launch_without_the_neuron_sdk_fails_with_exact_messages(args, purpose):
    result = run(*args)
    assert result.returncode == 3
    assert result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if "note: neuronx-distributed" not in line]
    assert lines == _expected_environment_lines(purpose)
    assert "Traceback" not in result.stderr


@off_trn1
def test_export_without_the_neuron_sdk_fails_before_loading_anything(tmp_path, tiny_model_dir):
    result = run("export_inference.py", "--model", str(tiny_model_dir), "--out", str(tmp_path / "out"))
    assert result.returncode == 3
    lines = [line for line in result.stderr.splitlines() if "note: neuronx-distributed" not in line]
    assert lines == _expected_environment_lines("export")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
        (["--prompt-length", "x"], "argument --prompt-length: expected an integer, got 'x'"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--check-steps", "-1"], "--check-steps must be at least 0, got -1"),
    ],
)
def test_export_bad_arguments(tiny_model_dir, tmp_path, args, message):
    result = run("export_inference.py", "--model", str(tiny_model_dir), "--out", str(tmp_path / "o"), *args)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.splitlines()) == 1


def test_export_rejects_a_directory_that_is_no_model(tmp_path):
    result = run("export_inference.py", "--model", str(tmp_path), "--out", str(tmp_path / "o"))
    assert result.returncode == 2
    assert result.stderr == (
        f"export_inference.py: error: --model {str(tmp_path)!r} is neither a saved model "
        "(config.json + model.safetensors) nor a run directory with checkpoints\n"
    )


# ---------------------------------------------------------------------------------------------------------------
# check_env.py and env.sh
# ---------------------------------------------------------------------------------------------------------------
@off_trn1
def test_check_env_finds_stub_packages_and_counts_neuroncores(tmp_path, monkeypatch):
    for name in ("torch_xla", "torch_neuronx"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    missing, _, _ = check_env.problems("export", dev_dir=str(tmp_path))
    assert not any("torch-xla is not installed" in m or "torch-neuronx is not installed" in m for m in missing)
    assert check_env.MSG["devices"] in missing

    devices = tmp_path / "dev"
    devices.mkdir()
    (devices / "neuron0").write_text("")
    (devices / "neuron_tools").write_text("")  # not a device node
    missing, _, found = check_env.problems("train", cores=32, dev_dir=str(devices))
    assert found["NeuronCores"] == "2"
    assert check_env.MSG["devices"] not in missing
    assert (
        "this launch needs 32 NeuronCores but this machine has 1 Neuron device(s) = 2 NeuronCores: use the script "
        "for this instance size (trn1.2xlarge: 2, trn1.32xlarge: 32)"
    ) in missing
    missing, _, _ = check_env.problems("train", cores=2, dev_dir=str(devices))
    assert not any("NeuronCores" in m for m in missing)


def test_env_sh_sets_the_neuron_settings():
    script = (
        "set -euo pipefail; PJRT_DEVICE=CPU; NEURON_RT_STOCHASTIC_ROUNDING_EN=1; source neuron/env.sh; "
        'echo "$PJRT_DEVICE|$NEURON_CC_FLAGS|$NEURON_COMPILE_CACHE_URL|'
        '$NEURON_RT_STOCHASTIC_ROUNDING_EN|$XLA_USE_32BIT_LONG"'
    )
    env = {k: v for k, v in _env().items() if not k.startswith(("NEURON_", "XLA_"))}
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=ROOT, env=env, check=True).stdout
    pjrt, flags, cache, rounding, long32 = out.strip().split("|")
    assert pjrt == "NEURON"  # forced: a leftover CPU setting must not win
    assert flags == "--model-type=transformer -O1 --auto-cast=none --cache_dir=/var/tmp/neuron-compile-cache"
    assert cache == "/var/tmp/neuron-compile-cache"
    assert rounding == "1"  # set before sourcing: kept
    assert long32 == "1"
    executed = subprocess.run(["bash", "neuron/env.sh"], capture_output=True, text=True, cwd=ROOT)
    assert executed.returncode == 2 and "source this file" in executed.stderr


# ---------------------------------------------------------------------------------------------------------------
# Inference graphs: wrappers and tracing
# ---------------------------------------------------------------------------------------------------------------
B, P = 2, 6  # batch, prompt length (not a multiple of the chunk size 4)
STEPS = 14  # decode positions 6..19: chunk boundaries 8, 12, 16; the 16-slot ring wraps; eidetic memory evicts


def _config():
    # One layer of each type: every kind of state tensor is in the cache.
    return preset_config("tiny", num_hidden_layers=3, layers_block_type=["bmojo", "ssm", "attention"])


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return BMojoForCausalLM(_config()).eval()


@pytest.fixture(scope="module")
def tiny_model_dir(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-model")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 64, (B, P + STEPS), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def expected(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def test_state_spec_order_and_flatten_round_trip(model, tokens):
    spec = ig.state_spec(model.config, B)
    assert [e.key for e in spec[:2]] == ["layers.0.conv", "layers.0.ssm"]
    assert {e.layer for e in spec} == {0, 1, 2}
    assert [e.name for e in spec if e.layer == 1] == ["conv", "ssm"]
    assert [e.name for e in spec if e.layer == 2] == ["ring_k", "ring_v", "ring_pos"]
    with torch.no_grad():
        cache = model(tokens[:, :P], use_cache=True).cache  # the forward fills its dicts in another order
    flat = ig.flatten_cache(cache, spec)
    assert [tuple(t.shape) for t in flat] == [e.shape for e in spec]
    assert [t.dtype for t in flat] == [e.dtype for e in spec]
    back = ig.unflatten_cache(model.config, spec, cache.positions, flat)
    for layer, original in zip(back.layers, cache.layers):
        layer, original = layer.tensors(), original.tensors()
        assert set(layer) == set(original)
        assert all(layer[name] is original[name] for name in layer)
    assert all(a is b for a, b in zip(ig.flatten_cache(back, spec), flat))
    with pytest.raises(ValueError, match=f"expected {len(spec)} state tensors"):
        ig.unflatten_cache(model.config, spec, cache.positions, flat[:-1])
    cache.layers[2].ring_k = cache.layers[2].ring_k[:1]
    with pytest.raises(ValueError, match="layers.2.ring_k: the cache holds"):
        ig.flatten_cache(cache, spec)


def test_decode_wrapper_equals_decoding_with_the_model(model, tokens, expected):
    spec = ig.state_spec(model.config, B)
    prefill, decode = ig.PrefillGraph(model, spec), ig.DecodeGraph(model, spec)
    with torch.no_grad():
        logits, positions, *state = prefill(tokens[:, :P])
        assert torch.equal(positions, torch.full((B,), P))
        cache = model(tokens[:, :P], use_cache=True).cache
        torch.testing.assert_close(logits, expected[:, P - 1], rtol=0, atol=1e-5)
        for t in range(P, P + STEPS):
            inputs = (tokens[:, t], positions, *state)
            snapshot = [x.clone() for x in inputs]
            logits, positions, *state = decode(*inputs)
            assert all(torch.equal(a, b) for a, b in zip(inputs, snapshot))  # the graph's inputs stay untouched
            reference = model(tokens[:, t : t + 1], cache=cache).logits[:, 0]
            torch.testing.assert_close(logits, reference, rtol=0, atol=1e-6)
            torch.testing.assert_close(logits, expected[:, t], rtol=0, atol=1e-5)
        assert torch.equal(positions, cache.positions)
        for a, b in zip(state, ig.flatten_cache(cache, spec)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def _trace(module, inputs):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # shape-arithmetic TracerWarnings and the jit deprecation notice
        return torch.jit.trace(module, inputs, check_trace=False)


def test_traced_graphs_reproduce_the_eager_logits(model, tokens, expected):
    """torch.jit.trace with fixed shapes, traced on other data than it is run on: no value is baked in."""
    spec = ig.state_spec(model.config, B)
    torch.manual_seed(11)
    prefill_inputs, decode_inputs = ig.example_inputs(model.config, spec, B, P, torch.float32)
    prefill = _trace(ig.PrefillGraph(model, spec), prefill_inputs)
    decode = _trace(ig.DecodeGraph(model, spec), decode_inputs)  # traced at position 0, empty state
    assert len(list(decode.graph.inputs())) == 1 + 2 + len(spec)  # self, token, positions, state
    with torch.no_grad():
        logits, positions, *state = prefill(tokens[:, :P])
        assert logits.shape == (B, model.config.vocab_size) and len(state) == len(spec)
        torch.testing.assert_close(logits, expected[:, P - 1], rtol=0, atol=1e-5)
        for t in range(P, P + STEPS):
            logits, positions, *state = decode(tokens[:, t], positions, *state)
            torch.testing.assert_close(logits, expected[:, t], rtol=0, atol=1e-5)
        assert [tuple(s.shape) for s in state] == [e.shape for e in spec]


def test_cpu_trace_export_end_to_end(tiny_model_dir, tmp_path, model, capsys):
    """export_inference.py --cpu-trace: files, manifest, its own check, and greedy decoding with the graphs."""
    out = tmp_path / "exported"
    args = ["--model", str(tiny_model_dir), "--out", str(out), "--batch-size", str(B), "--prompt-length", str(P)]
    assert export_inference.main(args + ["--cpu-trace", "--check-steps", "3"]) == 0
    assert "3 decode steps max |dlogits|" in capsys.readouterr().err
    info = json.loads((out / "manifest.json").read_text())
    assert info["compiler"]["backend"].startswith("torch.jit.trace (CPU stand-in")
    spec = ig.state_spec(model.config, B)
    assert [s["name"] for s in info["decode"]["inputs"]] == ["token", "positions"] + [e.key for e in spec]
    assert info["decode"]["outputs"][2:] == info["decode"]["inputs"][2:]
    assert info["prefill"]["inputs"] == [{"name": "input_ids", "shape": [B, P], "dtype": "int64"}]

    runner = ig.NeuronBMojoGenerator.load(out)
    for length in (P + 3, P - 2):  # through prefill + decode, and (shorter than P) through decode alone
        prompt = torch.randint(0, 64, (B, length), generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            reference = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(runner.greedy(prompt, 6), reference)

    # A second export into the same directory is refused; --dry-run prints the manifest it would write.
    assert export_inference.main(args + ["--cpu-trace"]) == 2
    assert "already holds an export" in capsys.readouterr().err
    assert export_inference.main(args + ["--dry-run"]) == 0
    dry = json.loads(capsys.readouterr().out)
    assert dry["compiler"]["backend"] == "torch_neuronx.trace"
    assert dry["decode"] == info["decode"] and dry["prefill"] == info["prefill"]


def test_export_reads_a_run_directory(model, tmp_path, capsys):
    run_dir = tmp_path / "run"
    model.save_pretrained(run_dir / "checkpoints" / "step_000010")
    assert export_inference.main(["--model", str(run_dir), "--out", str(tmp_path / "o"), "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["source"].endswith("step_000010")


@pytest.mark.xla
def test_wrappers_on_an_xla_device_compile_one_decode_graph(model, tokens, expected):
    """On an XLA device (torch_neuronx.trace lowers through XLA): the prefill is one graph, the decode step one
    graph reused at every position, nothing falls back to the CPU or reads the device, and the logits match.

    Skipped without torch-xla; run it in the XLA tier's environment (scripts/setup_xla.sh):
    PJRT_DEVICE=CPU .venv-xla/bin/python -m pytest tests/test_neuron_scripts.py -k xla_device
    """
    import copy

    os.environ.setdefault("PJRT_DEVICE", "CPU")
    torch_xla = pytest.importorskip("torch_xla")
    import torch_xla.debug.metrics as met

    def counts():
        return (
            met.counter_value("UncachedCompile") or 0,
            met.counter_value("CachedCompile") or 0,
            sorted(n for n in met.counter_names() if n.startswith("aten::")),
            (met.metric_data("TransferFromDeviceTime") or [0])[0],
        )

    device = torch_xla.device()
    on_xla = copy.deepcopy(model).to(device)
    on_xla.tie_weights()  # Module.to unties lm_head from the embedding when the tensor type changes
    spec = ig.state_spec(model.config, B)
    prefill, decode = ig.PrefillGraph(on_xla, spec), ig.DecodeGraph(on_xla, spec)
    with torch.no_grad():
        before = counts()
        logits, positions, *state = prefill(tokens[:, :P].to(device))
        torch_xla.sync()
        after = counts()
        assert (after[0] - before[0], after[1] - before[1]) == (1, 0)
        results = [logits]
        per_step = []
        for t in range(P, P + STEPS):
            before = counts()
            logits, positions, *state = decode(tokens[:, t].to(device), positions, *state)
            if t == P + 1:
                hlo = torch_xla._XLAC._get_xla_tensors_hlo([logits, positions, *state])
            torch_xla.sync()
            after = counts()
            per_step.append((after[0] - before[0], after[1] - before[1]))
            results.append(logits)
        assert per_step == [(1, 0)] + [(0, 1)] * (STEPS - 1)  # one graph, compiled once, for every position
        assert counts()[2] == [] and counts()[3] == 0  # no CPU fallback, no device read during decoding
    # No loop, sort, data-dependent branch or dynamic shape in the decode graph (docs/xla.md, static-graph rules).
    for opcode in ("while", "sort", "conditional", "set-dimension-size", "get-dimension-size"):
        assert not re.search(rf"\s{opcode}\(", hlo), opcode
    assert not re.search(r"\[[^\]]*<=[^\]]*\]", hlo), "dynamic dimension"
    for i, got in enumerate(results):
        torch.testing.assert_close(got.cpu(), expected[:, P - 1 + i], rtol=0, atol=1e-5)
