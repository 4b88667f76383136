"""``bmojo train --device xla`` (the trn1 path) on torch-xla's CPU client: the same numbers as the CPU run, a
number of graphs that does not grow with the steps, checkpoints saved after the step barrier that load on the
CPU, exact resume, the divergence check in a step closure, and bf16 autocast."""

import json
import os
import random
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.xla  # needs torch-xla: run by the XLA tier (scripts/test.sh)

torch_xla = pytest.importorskip("torch_xla")

import torch  # noqa: E402
import torch_xla.debug.metrics as met  # noqa: E402

from bmojo import checkpoint as ckpt  # noqa: E402
from bmojo.cli import main  # noqa: E402
from bmojo.data import load_corpus  # noqa: E402
from bmojo.tokenization import load_tokenizer  # noqa: E402
from bmojo.evaluation import evaluate

WORDS = ["def", "return", "self", "import", "class", "if", "else", "for", "in", "range", "(x)", ":", "\n    "]
STEPS = 8


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "salad.py"
    rng = random.Random(0)
    path.write_text("".join(rng.choice(WORDS) + " " for _ in range(6000)))
    return path


def args(corpus, out, *extra):
    return [
        "train", "--preset", "tiny", "--data", str(corpus), "--out", str(out), "--seq-len", "32", "--batch-size", "4",
        "--threads", "1", "--lr", "3e-3", "--warmup-steps", "2", "--steps", str(STEPS), "--eval-every", "4",
        "--save-every", "4", "--set", "train.eval_batches=2", "--set", "train.sample_tokens=8", *extra,
    ]  # fmt: skip


def records(run, split="train"):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split]


def uncached_compiles() -> int:
    return met.counter_value("UncachedCompile") or 0


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    """The same run on the CPU and on XLA; the graphs XLA compiled for it."""
    root = tmp_path_factory.mktemp("runs")
    assert main(args(corpus, root / "cpu")) == 0
    before = uncached_compiles()
    assert main(args(corpus, root / "xla", "--device", "xla")) == 0
    return root, uncached_compiles() - before


def test_xla_run_gives_the_cpu_numbers(runs):
    root, _ = runs
    for split, keys in (("train", ("lm_loss", "innovation_loss", "grad_norm", "lr")), ("val", ("lm_loss",))):
        cpu, xla = records(root / "cpu", split), records(root / "xla", split)
        assert [r["step"] for r in xla] == [r["step"] for r in cpu] and len(cpu) > 1
        for a, b in zip(cpu, xla, strict=True):
            for key in keys:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (split, a["step"], key)


def test_xla_run_with_checkpointing_and_selective_recompute_gives_the_cpu_numbers(runs, corpus, tmp_path,
                                                                                 monkeypatch):
    """``--gradient-checkpointing --selective-recompute`` on XLA (``torch_xla.utils.checkpoint``) change no number:
    the same losses, gradient norms and validation losses as the plain CPU run, and the run's graphs are still
    compiled once, not per step. Both recompute on the XLA device: the layers and their ops go through
    ``recompute``, which picks torch_xla's checkpoint there."""
    import bmojo.layers.common as mixer_common
    import bmojo.modeling_bmojo as modeling

    recomputed = {"layer": [], "op": []}
    real = mixer_common.recompute

    def counting(kind):
        def wrapped(fn, *a, **kw):
            recomputed[kind].append(next(t for t in a if isinstance(t, torch.Tensor)).device.type)
            return real(fn, *a, **kw)

        return wrapped

    monkeypatch.setattr(modeling, "recompute", counting("layer"))
    monkeypatch.setattr(mixer_common, "recompute", counting("op"))
    root, _ = runs
    before = uncached_compiles()
    assert main(args(corpus, tmp_path / "both", "--device", "xla", "--gradient-checkpointing",
                     "--selective-recompute")) == 0  # fmt: skip
    assert 2 <= uncached_compiles() - before <= 5
    assert set(recomputed["layer"]) == set(recomputed["op"]) == {"xla"}  # every training forward recomputes
    for split, keys in (("train", ("lm_loss", "innovation_loss", "grad_norm")), ("val", ("lm_loss",))):
        cpu, xla = records(root / "cpu", split), records(tmp_path / "both", split)
        assert [r["step"] for r in xla] == [r["step"] for r in cpu] and len(cpu) > 1
        for a, b in zip(cpu, xla, strict=True):
            for key in keys:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (split, a["step"], key)


def test_graphs_are_compiled_once_not_per_step(runs, corpus, tmp_path):
    """The 8-step run compiled at most five graphs: the train step twice (the first step creates the gradient and
    optimizer-state tensors), the evaluation forward twice (its first batch adds to a fresh zero sum, later ones to
    device data) and the final read of the evaluation sums. A run twice as long, with its own learning rates,
    eval points and saves, compiles nothing new: the learning rate and Adam's bias corrections are graph inputs,
    not constants."""
    _, compiled = runs
    assert 2 <= compiled <= 5, compiled
    before = uncached_compiles()
    longer = args(corpus, tmp_path / "long", "--device", "xla")
    longer[longer.index("--steps") + 1] = str(2 * STEPS)
    assert main(longer) == 0
    assert uncached_compiles() == before
    assert len(records(tmp_path / "long")) == 2 * STEPS


def test_checkpoints_saved_on_xla_load_on_the_cpu(runs, corpus):
    root, _ = runs
    run = root / "xla"
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_000004", "step_000008"]
    model = ckpt.load_model(ckpt.list_checkpoints(run)[-1])
    assert model.lm_head.weight is model.model.embed_tokens.weight  # saved tied, loads tied
    tokenizer = load_tokenizer(run / "tokenizer")
    data = load_corpus([str(corpus)], tokenizer, 32, 0.01)
    windows = data.val_windows[:8]  # eval_batches x micro-batch, as in training
    result = evaluate(model, data, windows, 4, torch.device("cpu"))
    assert result["lm_loss"] == pytest.approx(records(run, "val")[-1]["lm_loss"], rel=1e-5)
    cpu_model = ckpt.load_model(ckpt.list_checkpoints(root / "cpu")[-1])
    for (name, a), b in zip(cpu_model.state_dict().items(), model.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-5, msg=name)


def test_resume_on_xla_repeats_the_lost_steps_exactly(runs, corpus, tmp_path):
    root, _ = runs
    run = tmp_path / "run"
    shutil.copytree(root / "xla", run)
    shutil.rmtree(run / "checkpoints" / "step_000008")  # as if the job died after step 7
    assert main(args(corpus, run, "--device", "xla", "--resume")) == 0
    assert records(run) == records(root / "xla")[:4] + records(run)[4:]
    for a, b in zip(records(root / "xla")[4:], records(run)[4:], strict=True):
        assert {k: v for k, v in a.items() if k != "tokens_per_s"} == {
            k: v for k, v in b.items() if k != "tokens_per_s"
        }


def test_divergence_is_caught_in_a_step_closure(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    extra = ("--device", "xla", "--save-every", "1", "--lr", "1e30", "--warmup-steps", "0")
    assert main(args(corpus, run, *extra)) == 3
    good = ckpt.list_checkpoints(run)
    assert [p.name for p in good] == ["step_000001"]
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (
        "bmojo: error: training diverged at step 2: loss nan, gradient norm nan; stopped, "
        f"the last good checkpoint is {good[0]} (try a lower --lr)"
    )


def test_bf16_autocast_trains_close_to_fp32(runs, corpus, tmp_path):
    root, _ = runs
    assert main(args(corpus, tmp_path / "bf16", "--device", "xla", "--bf16")) == 0
    fp32, bf16 = records(root / "xla"), records(tmp_path / "bf16")
    assert [r["lm_loss"] for r in bf16] == pytest.approx([r["lm_loss"] for r in fp32], abs=0.05)
    assert bf16[-1]["lm_loss"] < bf16[0]["lm_loss"] - 0.3  # it learns


def test_several_processes_on_the_cpu_client_are_refused(corpus, tmp_path):
    """torch-xla's CPU client gives each torchrun process a world of its own; training on would average nothing.
    (Several XLA processes need NeuronCores: that path has not run here.)"""
    env = dict(os.environ, PJRT_DEVICE="CPU", OMP_NUM_THREADS="1")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "bmojo.cli",
    ]
    done = subprocess.run(
        [*command, *args(corpus, tmp_path / "run", "--device", "xla")], env=env, capture_output=True, text=True
    )
    assert done.returncode != 0
    assert (
        "bmojo: error: torchrun started 2 processes but the xla process group holds 1; several XLA processes need "
        "Neuron devices (PJRT_DEVICE=NEURON on trn1), torch-xla's CPU client runs one"
    ) in done.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
