"""A converted model (``bmojo convert`` of a transformers Llama) trains on XLA with one graph per step, and
``bmojo train --init --teacher --device xla`` (priming, the teacher's forward inside the step) compiles its graphs
once, not per step, and gives the CPU run's numbers."""

import json

import pytest

pytestmark = pytest.mark.xla  # needs torch-xla: run by the XLA tier (scripts/test.sh)

torch_xla = pytest.importorskip("torch_xla")

import torch  # noqa: E402
import torch_xla.debug.metrics as met  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from bmojo import xla_audit as xa  # noqa: E402
from bmojo.checkpoint import load_model  # noqa: E402
from bmojo.cli import main  # noqa: E402
from bmojo.priming import set_key_set_biases, set_trainable  # noqa: E402
from bmojo.tokenization import ByteTokenizer  # noqa: E402

STEPS = 6
WARMUP = 2


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=264, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=True, pad_token_id=0,
        bos_token_id=1, eos_token_id=2,
    ))  # fmt: skip
    llama.save_pretrained(root / "src")
    ByteTokenizer().save(root / "src")
    flags = ["--chunk-size", "8", "--window", "8", "--memory-size", "4", "--layers", "bmojo,attention"]
    assert main(["convert", "--from", str(root / "src"), "--out", str(root / "dst"), *flags]) == 0
    (root / "a.txt").write_text("def f(x):\n    return x + 1\n" * 200)
    return root


def test_converted_model_trains_with_one_graph_per_step(converted):
    model = load_model(converted / "dst")
    set_key_set_biases(model, -4.0)
    set_trainable(model, "new")
    run = xa.run_training(xa.to_xla(model), STEPS)
    assert sum(s.uncached for s in run.steps[:WARMUP]) <= 2, [s.uncached for s in run.steps]
    assert [s.uncached for s in run.steps[WARMUP:]] == [0] * (STEPS - WARMUP)
    assert [s.executed for s in run.steps] == [1] * STEPS
    assert [s.host_reads for s in run.steps] == [0] * STEPS


def _prime(root, out, steps, *extra):
    return main([
        "train", "--init", str(root / "dst"), "--teacher", str(root / "src"), "--trainable", "new",
        "--key-set-bias-start", "-4", "--data", str(root / "a.txt"), "--out", str(out), "--seq-len", "32",
        "--batch-size", "2", "--steps", str(steps), "--threads", "1", "--warmup-steps", "1", "--eval-every", "0",
        "--save-every", "0", "--set", "train.sample_tokens=4", "--set", "train.eval_batches=1", *extra,
    ])  # fmt: skip


def test_priming_on_xla_compiles_once_and_gives_the_cpu_numbers(converted):
    assert _prime(converted, converted / "cpu", STEPS) == 0
    before = met.counter_value("UncachedCompile") or 0
    assert _prime(converted, converted / "xla", STEPS, "--device", "xla") == 0
    compiled = (met.counter_value("UncachedCompile") or 0) - before
    # Not per step (6 steps): the train step twice, the evaluation forward twice, the final read.
    assert compiled <= 5, compiled

    def train_records(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [r for r in rows if r["split"] == "train"]

    cpu, xla = train_records(converted / "cpu"), train_records(converted / "xla")
    assert len(cpu) == len(xla) == STEPS
    for a, b in zip(cpu, xla, strict=True):
        for key in ("lm_loss", "distill_loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
