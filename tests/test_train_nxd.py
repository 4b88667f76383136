"""``bmojo train --device xla --tp N [--zero1]``: the neuronx-distributed path of the loop, run on the CPU with the
stand-ins of ``tests/neuron_standin`` (torch-xla and NxD re-implemented on gloo) under ``torch.distributed.run``.

The runs equal one CPU process at the same global batch (float32, the only dtype on xla: losses and gradient
norms within rel. 1e-5, observed ~2e-7; final weights within 1e-5, observed ~1e-6, as for the CPU path's own
``--tp 2``: AdamW turns float32 rounding in near-zero gradients into steps of up to lr), with tensor-parallel
groups of adjacent ranks and with NxD's strided ones; the call log shows what the loop asked of NxD (the parallel
sizes, the optimizer wrapper, the groups gradients are reduced over, one ``mark_step`` per step); the checkpoints
have the CPU path's per-rank layout and resume at another layout. None of this is the real NxD or a NeuronCore
(tests/neuron_standin/README.md says what the stand-ins cannot show)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bmojo import checkpoint as ckpt
from bmojo.parallel import split_state_dict
from bmojo.configuration_bmojo import BMojoConfig
from support import metrics_records as records, word_salad

TESTS = Path(__file__).resolve().parent
SRC = str(TESTS.parent / "src")
STANDIN = TESTS / "neuron_standin"
STEPS, EVALS, EVAL_BATCHES = 8, 3, 2  # evaluations at steps 0, 4 and 8


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return word_salad(tmp_path_factory.mktemp("corpus"), ("a.py", "b.py"))


def tiny(corpus: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--preset", "tiny", "--data", str(corpus), "--out", str(out), "--seq-len", "32", "--threads", "1",
        "--lr", "3e-3", "--warmup-steps", "2", "--set", f"train.eval_batches={EVAL_BATCHES}",
        "--set", "train.sample_tokens=8", "--steps", str(STEPS), "--save-every", "3", "--eval-every", "4",
        "--batch-size", "8", "--grad-accum", "2", "--set", "model.ssm_ngroups=2", "--set", "train.keep_checkpoints=5",
        *extra,
    ]  # fmt: skip


def run(args: list[str], nproc: int = 1, path: str | None = None, **variables) -> subprocess.CompletedProcess:
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    env = dict(os.environ, OMP_NUM_THREADS="1", **variables)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (path, SRC, os.environ.get("PYTHONPATH")) if p)
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)
    env.update(variables)
    return subprocess.run([sys.executable, *launcher, "-m", "bmojo.cli", *args], env=env, capture_output=True,
                          text=True)  # fmt: skip


def run_ok(args, nproc=1, path=None, **variables) -> str:
    done = run(args, nproc, path, **variables)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def standin(args, nproc, log: Path, **variables) -> str:
    log.mkdir()
    return run_ok([*args, "--device", "xla"], nproc, str(STANDIN), BMOJO_STANDIN_LOG=str(log), **variables)


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    run_ok(tiny(corpus, root / "one"))  # the CPU path, one process, the same global batch
    stdout = standin(tiny(corpus, root / "tp2", "--tp", "2"), 2, root / "tp2.log")
    assert "2 process(es) x 1 thread(s) | tp 2 x dp 1" in stdout
    # NxD's own layout on trn1 for tp 4: tensor-parallel groups strided across the node ([0, 2], [1, 3] here).
    stdout = standin(tiny(corpus, root / "zero1", "--tp", "2", "--zero1"), 4, root / "zero1.log",
                     BMOJO_STANDIN_NXD_LAYOUT="strided")  # fmt: skip
    assert "tp 2 x dp 2 | ZeRO-1" in stdout
    return {name: root / name for name in ("one", "tp2", "zero1", "tp2.log", "zero1.log")}


def assert_same_run(actual: Path, expected: Path) -> None:
    for split in ("train", "val"):
        a, e = records(actual, split), records(expected, split)
        assert [r["step"] for r in a] == [r["step"] for r in e]
        for ra, re in zip(a, e, strict=True):
            for key in ra:
                assert ra[key] == pytest.approx(re[key], rel=1e-5, abs=1e-8), (split, ra["step"], key)
    a, e = (load_file(ckpt.list_checkpoints(d)[-1] / "model.safetensors") for d in (actual, expected))
    assert set(a) == set(e)
    for name in e:
        torch.testing.assert_close(a[name], e[name], rtol=1e-5, atol=1e-5, msg=name)


def calls(log: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (log / f"rank{rank}.jsonl").read_text().splitlines()]


def one(events: list[dict], call: str) -> dict:
    found = [e for e in events if e["call"] == call]
    assert len(found) == 1, (call, found)
    return found[0]


@pytest.mark.parametrize("name", ["tp2", "zero1"])
def test_the_nxd_path_equals_one_cpu_process(runs, name):
    assert_same_run(runs[name], runs["one"])


def test_tp2_asks_nxd_for_its_groups_and_reduces_gradients_over_the_data_parallel_group(runs):
    for rank in range(2):
        events = calls(runs["tp2.log"], rank)
        config = one(events, "neuronx_distributed_config")
        assert config["tensor_parallel_size"] == 2 and config["optimizer_config"] == {
            "zero_one_enabled": False, "grad_clipping": True, "max_grad_norm": 1.0}  # fmt: skip
        groups = one(events, "initialize_model_parallel")
        assert (groups["tensor_model_parallel_size"], groups["world"]) == (2, 2)
        assert one(events, "initialize_parallel_model")["tensor_parallel_parameters"] > 0
        assert one(events, "initialize_parallel_optimizer")["wrapper"] == "AdamW"
        reductions = [e for e in events if e["call"] == "bucket_allreduce_gradients"]
        assert len(reductions) == STEPS and all(e["group"] == [rank] for e in reductions)  # dp 1: its own group
        norms = [e for e in events if e["call"] == "get_grad_norm"]
        assert len(norms) == STEPS and all(e["groups"] == {"tp": [0, 1]} for e in norms)


def test_one_mark_step_per_training_step(runs):
    for log, world in ((runs["tp2.log"], 2), (runs["zero1.log"], 4)):
        for rank in range(world):
            events = [e["call"] for e in calls(log, rank) if e["call"] in ("NxDOptimizer.step", "mark_step")]
            assert events.count("NxDOptimizer.step") == STEPS
            assert events.count("mark_step") == STEPS + EVALS * EVAL_BATCHES  # each evaluation batch is a graph
            steps = [i for i, e in enumerate(events) if e == "NxDOptimizer.step"]
            assert all(events[i + 1] == "mark_step" for i in steps)  # the update ends its step's graph


def test_zero1_shards_over_nxd_data_parallel_groups_and_clips_over_both(runs):
    tp_groups, dp_groups = [[0, 2], [1, 3]], [[0, 1], [2, 3]]
    for rank in range(4):
        events = calls(runs["zero1.log"], rank)
        assert one(events, "initialize_model_parallel")["tp_groups"] == tp_groups
        zero = one(events, "NeuronZero1Optimizer")
        assert zero["sharding_groups"] == dp_groups and zero["grad_norm_groups"] == tp_groups
        assert zero["optimizer_class"] == "AdamW" and zero["max_norm"] == 1.0
        assert one(events, "initialize_parallel_optimizer")["wrapper"] == "NeuronZero1Optimizer"
        mine_dp = next(g for g in dp_groups if rank in g)
        mine_tp = next(g for g in tp_groups if rank in g)
        scatters = [e for e in events if e["call"] == "zero1_reduce_scatter"]
        assert len(scatters) == STEPS and all(e["group"] == mine_dp for e in scatters)
        assert all(e["groups"] == {"tp": mine_tp, "zero1": mine_dp} for e in events if e["call"] == "get_grad_norm")
        assert not [e for e in events if e["call"] == "bucket_allreduce_gradients"]


def test_checkpoints_have_the_cpu_layout_with_nxd_ranks(runs):
    last = ckpt.list_checkpoints(runs["zero1"])[-1]
    assert sorted(p.name for p in last.iterdir()) == sorted(
        ["checksums.sha256", "config.json", "model.safetensors", "training_state.json"]
        + [f"model-tp{r}-of-2.safetensors" for r in range(2)]
        + [f"training_state-rank{g}-of-4.safetensors" for g in range(4)]
    )
    ckpt.verify_checkpoint(last)
    full = load_file(last / "model.safetensors")
    config = BMojoConfig.from_pretrained(last)
    for tp_rank, expected in enumerate(split_state_dict(full, config, 2)):
        shard = load_file(last / f"model-tp{tp_rank}-of-2.safetensors")
        assert all(torch.equal(shard[k], expected[k]) for k in shard)
    # Strided groups: global ranks 0, 1 are tensor-parallel rank 0 (data-parallel ranks 0, 1), ranks 2, 3 rank 1.
    states = [load_file(last / f"training_state-rank{g}-of-4.safetensors") for g in range(4)]
    assert [(int(s["layout.tp_rank"]), int(s["layout.dp_rank"])) for s in states] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    # ZeRO-1 keeps dim-0 chunks of each tensor-parallel shard: half of its rows on each data-parallel rank.
    for name in ("model.layers.0.mixer.q_proj.weight", "model.layers.1.mixer.ssm.A_log"):
        for tp_rank in range(2):
            shard = load_file(last / f"model-tp{tp_rank}-of-2.safetensors")[name]
            chunks = [states[2 * tp_rank + dp][f"zero1.{name}.exp_avg"] for dp in range(2)]
            assert [c.shape[0] for c in chunks] == [shard.shape[0] // 2] * 2
            assert torch.cat(chunks).shape == shard.shape
        assert f"optimizer.{name}.step" in states[0]  # scalars are not chunked


def test_resume_nxd_zero1_at_another_layout_continues_the_run(runs, corpus, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(runs["zero1"], resumed)
    for later in ckpt.list_checkpoints(resumed)[1:]:
        shutil.rmtree(later)
    (resumed / "sample.txt").unlink()
    # tp 2 x dp 2 (strided) -> tp 1 x dp 2: ZeRO-1's row chunks merged, then cut for the new data-parallel size.
    stdout = standin(tiny(corpus, resumed, "--resume", "--tp", "1", "--zero1"), 2, tmp_path / "log")
    assert "from step_000003" in stdout
    assert_same_run(resumed, runs["one"])


def test_without_neuronx_distributed_the_xla_path_is_one_line_before_anything_is_written(corpus, tmp_path):
    only_xla = tmp_path / "path"
    only_xla.mkdir()
    for name in ("torch_xla", "_standin_log.py"):
        (only_xla / name).symlink_to(STANDIN / name)
    out = tmp_path / "run"
    done = run(tiny(corpus, out, "--tp", "2", "--device", "xla"), 1, str(only_xla), WORLD_SIZE="2", RANK="0")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(
        "bmojo: error: --device xla with --tp/--zero1 trains through neuronx-distributed, which does not import "
        "here (ModuleNotFoundError: No module named 'neuronx_distributed'): on trn1 run in the Neuron SDK 2.28"
    ), done.stderr
    assert not (out / "checkpoints").exists()


def test_zero1_row_chunks_cover_the_rows_once_whatever_the_padding():
    from bmojo.parallel.training import _chunk_rows, _pad_rows

    for rows in range(1, 12):
        for parts in (1, 2, 3, 4, 8):
            tensor = torch.arange(rows * 2.0).reshape(rows, 2)
            padded = _pad_rows(tensor, parts)
            assert padded.shape[0] % parts == 0 and torch.equal(padded[:rows], tensor) and not padded[rows:].any()
            chunks = padded.chunk(parts)
            real = [chunk[: _chunk_rows(rows, parts, k)] for k, chunk in enumerate(chunks)]
            assert torch.equal(torch.cat(real), tensor), (rows, parts)
