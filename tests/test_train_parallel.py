"""``bmojo train --tp N [--zero1]`` under ``torchrun`` (gloo, float64 through the hidden ``train.dtype`` setting):
tp x dp runs equal one process at the same global batch, ZeRO-1 equals AdamW, per-rank checkpoints resume exactly
at the same degree (after SIGKILL) and at another one, bad combinations are one line."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bmojo import checkpoint as ckpt
from bmojo.cli import main
from bmojo.modeling_bmojo import BMojoForCausalLM
from support import metrics_records as records, word_salad

SRC = str(Path(__file__).resolve().parents[1] / "src")
STEPS = 8
# ssm_ngroups=2: the tiny preset's single SSM group cannot be split in two. learned_selection: its replicated
# selection_bias is trained through every rank's own heads (its gradient is summed over the tensor-parallel ranks).
ARGS = [
    "--steps", str(STEPS), "--save-every", "3", "--eval-every", "4", "--batch-size", "8", "--grad-accum", "2",
    "--set", "model.ssm_ngroups=2", "--set", "model.learned_selection=true", "--set", "train.dtype=float64",
    "--set", "train.keep_checkpoints=5",
]  # fmt: skip


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return word_salad(tmp_path_factory.mktemp("corpus"), ("a.py", "b.py"))


def tiny(corpus: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--preset", "tiny", "--data", str(corpus), "--out", str(out), "--seq-len", "32", "--threads", "1",
        "--lr", "3e-3", "--warmup-steps", "2", "--set", "train.eval_batches=2", "--set", "train.sample_tokens=8",
        *ARGS, *extra,
    ]  # fmt: skip


def command(args: list[str], nproc: int = 1) -> list[str]:
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    return [sys.executable, *launcher, "-m", "bmojo.cli", *args]


def env() -> dict:
    values = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        values.pop(key, None)
    return values


def run(args: list[str], nproc: int = 1) -> str:
    done = subprocess.run(command(args, nproc), env=env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def assert_close_records(actual: Path, expected: Path) -> None:
    for split in ("train", "val"):
        a, e = records(actual, split), records(expected, split)
        assert [r["step"] for r in a] == [r["step"] for r in e]
        for ra, re in zip(a, e, strict=True):
            for key in ra:
                assert ra[key] == pytest.approx(re[key], rel=1e-6, abs=1e-12), (split, ra["step"], key)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(ckpt.list_checkpoints(run_dir)[-1] / "model.safetensors")


def assert_close_weights(actual: Path, expected: Path) -> None:
    a, e = final_weights(actual), final_weights(expected)
    assert set(a) == set(e)
    for name in e:
        assert a[name].dtype == torch.float64
        torch.testing.assert_close(a[name], e[name], rtol=1e-6, atol=1e-10, msg=name)


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    layouts = {"one": (1, []), "tp2": (2, ["--tp", "2"]), "tp2dp2": (4, ["--tp", "2"]),
               "tp2dp2_zero1": (4, ["--tp", "2", "--zero1"])}  # fmt: skip
    for name, (nproc, extra) in layouts.items():
        stdout = run(tiny(corpus, root / name, *extra), nproc)
        if name == "tp2dp2_zero1":
            assert f"{nproc} process(es) x 1 thread(s) | tp 2 x dp 2 | ZeRO-1" in stdout
    return {name: root / name for name in layouts}


@pytest.mark.parametrize("name", ["tp2", "tp2dp2", "tp2dp2_zero1"])
def test_tensor_parallel_run_equals_one_process(runs, name):
    assert_close_records(runs[name], runs["one"])
    assert_close_weights(runs[name], runs["one"])  # the merged model.safetensors of the last checkpoint


def test_each_rank_holds_its_shard_and_the_final_model_loads_with_from_pretrained(runs):
    last = ckpt.list_checkpoints(runs["tp2dp2"])[-1]
    full = load_file(last / "model.safetensors")
    for rank in range(2):
        shard = load_file(last / f"model-tp{rank}-of-2.safetensors")
        q = "model.layers.0.mixer.q_proj.weight"
        rows = full[q].shape[0] // 2
        assert torch.equal(shard[q], full[q][rank * rows : (rank + 1) * rows])
        assert torch.equal(shard["model.embed_tokens.weight"], full["model.embed_tokens.weight"])  # replicated
    assert sorted(p.name for p in last.glob("training_state-rank*")) == [
        f"training_state-rank{g}-of-4.safetensors" for g in range(4)
    ]
    ckpt.verify_checkpoint(last)  # every file is in the manifest
    listed = {line.split("  ")[1] for line in (last / ckpt.MANIFEST).read_text().splitlines()}
    assert listed == {p.name for p in last.iterdir()} - {ckpt.MANIFEST}
    model = BMojoForCausalLM.from_pretrained(last)
    assert torch.equal(model.state_dict()["model.layers.0.mixer.q_proj.weight"].double(), full[q].double())


def test_zero1_shards_the_adamw_state_over_the_data_parallel_ranks(runs):
    last = ckpt.list_checkpoints(runs["tp2dp2_zero1"])[-1]
    plain = ckpt.list_checkpoints(runs["tp2dp2"])[-1]

    def params(path):
        return {k.rsplit(".", 1)[0] for k in load_file(path) if k.startswith("optimizer.")}

    for tp_rank in range(2):  # global ranks tp_rank (dp 0) and 2 + tp_rank (dp 1)
        dp0, dp1 = (params(last / f"training_state-rank{g}-of-4.safetensors") for g in (tp_rank, 2 + tp_rank))
        assert dp0 and dp1 and not dp0 & dp1
        assert dp0 | dp1 == params(plain / f"training_state-rank{tp_rank}-of-4.safetensors")


def _resume_copy(run_dir: Path, target: Path, step: int) -> Path:
    """``run_dir`` as it was just after the checkpoint of ``step``: newer checkpoints and the sample removed."""
    shutil.copytree(run_dir, target)
    for later in ckpt.list_checkpoints(target):
        if int(later.name[5:]) > step:
            shutil.rmtree(later)
    (target / "sample.txt").unlink()
    return target


def test_resume_at_tp1_from_a_tp2_dp2_zero1_checkpoint_continues_identically(runs, corpus, tmp_path):
    resumed = _resume_copy(runs["tp2dp2_zero1"], tmp_path / "resumed", 3)
    # One process, no ZeRO (tp and zero1 may change on --resume): model and AdamW state merged by the plan.
    stdout = run(tiny(corpus, resumed, "--resume", "--tp", "1", "--set", "train.zero1=false"))
    assert "resuming" in stdout and "step_000003" in stdout
    assert_close_records(resumed, runs["one"])
    assert_close_weights(resumed, runs["one"])


def test_sigkill_then_resume_at_tp2_repeats_the_uninterrupted_run(runs, corpus, tmp_path):
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        command(tiny(corpus, killed, "--tp", "2"), 2), env=env(), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        logged = (killed / "metrics.jsonl").read_text() if (killed / "metrics.jsonl").exists() else ""
        if (killed / "checkpoints" / "step_000003").exists() and '"step": 5, "split": "train"' in logged:
            break
        time.sleep(0.005)
    # The ranks first (torchrun starts each in a session of its own), then torchrun: all die mid-step.
    for child in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split():
        os.kill(int(child), signal.SIGKILL)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    newest = ckpt.list_checkpoints(killed)[-1].name
    assert newest in ("step_000003", "step_000006")
    assert max(r["step"] for r in records(killed, "train")) > int(newest[5:])
    stdout = run(tiny(corpus, killed, "--tp", "2", "--resume"), 2)
    assert f"from {newest}" in stdout
    assert records(killed, "train") == records(runs["tp2"], "train")  # bit for bit
    assert records(killed, "val") == records(runs["tp2"], "val")
    for name, tensor in final_weights(runs["tp2"]).items():
        assert torch.equal(final_weights(killed)[name], tensor), name


@pytest.mark.parametrize(
    ("extra", "world", "message"),
    [
        (["--tp", "3"], "1", "--tp 3: the model's num_attention_heads (4) must be divisible by the tensor-parallel "
         "size (3)"),
        (["--tp", "2", "--set", "model.ssm_ngroups=1"], "2",
         "--tp 2: the model's ssm_ngroups (1) must be divisible by the tensor-parallel size (2)"),
        (["--tp", "2"], "1", "--tp 2 needs a process group and this is a single process: launch with torchrun "
         "--nproc_per_node=<a multiple of the tensor-parallel degree>"),
        (["--zero1"], "1", "--zero1 needs a process group and this is a single process"),
        (["--tp", "2"], "3", "--tp 2 must divide the number of processes (3)"),
        (["--tp", "2", "--device", "xla", "--set", "train.dtype=float32"], "3",
         "--tp 2 must divide the number of processes (3)"),  # xla is checked the same way, before NxD is imported
        (["--tp", "2", "--batch-size", "6"], "4", "train.batch_size must be a multiple of data-parallel groups "
         "(4 processes / tp 2) x grad_accum (2 x 2), got 6"),
    ],
)  # fmt: skip
def test_bad_combinations_are_one_line_before_any_process_group(
    corpus, tmp_path, monkeypatch, capsys, extra, world, message
):
    # WORLD_SIZE as torchrun sets it: the settings are checked before the process group is formed.
    monkeypatch.setenv("WORLD_SIZE", world)
    monkeypatch.setenv("RANK", "0")
    args = tiny(corpus, tmp_path / "run", *extra)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bmojo: error: ") and message in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_checkpoint_saved_before_the_end_loads_merged_for_eval_and_export(runs, tmp_path):
    early = ckpt.list_checkpoints(runs["tp2dp2"])[0]
    assert not (early / "model.safetensors").exists()  # only the last checkpoint carries the merged model
    assert ckpt.resolve_checkpoint(early) == early
    model = ckpt.load_model(early)  # what bmojo eval / generate / export read
    shards = [load_file(early / f"model-tp{r}-of-2.safetensors") for r in range(2)]
    name = "model.layers.1.mlp.down_proj.weight"  # row-parallel: columns concatenated
    assert torch.equal(model.state_dict()[name], torch.cat([shards[0][name], shards[1][name]], dim=1))
    assert main(["export", str(early), "--out", str(tmp_path / "exported")]) == 0
    exported = BMojoForCausalLM.from_pretrained(tmp_path / "exported")
    assert torch.equal(exported.state_dict()[name].double(), model.state_dict()[name])


def test_resume_at_tp2_from_a_run_without_tp_continues_it(corpus, tmp_path):
    # float32 (the default): the run writes checkpoint.py's own format (AdamW state by parameter index).
    whole = tmp_path / "whole"
    run(tiny(corpus, whole, "--set", "train.dtype=float32"))
    assert not list(ckpt.list_checkpoints(whole)[0].glob("training_state-rank*"))
    resumed = _resume_copy(whole, tmp_path / "resumed", 3)
    stdout = run(tiny(corpus, resumed, "--set", "train.dtype=float32", "--resume", "--tp", "2"), 2)
    assert "tp 2 x dp 1" in stdout
    for split in ("train", "val"):
        a, e = records(resumed, split), records(whole, split)
        assert [r["step"] for r in a] == [r["step"] for r in e]
        for ra, re in zip(a, e, strict=True):
            for key in ra:
                assert ra[key] == pytest.approx(re[key], rel=1e-4, abs=1e-6), (split, ra["step"], key)


def test_memory_table_counts_the_parameters_a_rank_holds():
    from bmojo.configuration_bmojo import BMojoConfig
    from bmojo.parallel import memory, split_state_dict
    from bmojo.presets import PRESETS

    config = BMojoConfig(**{**PRESETS["tiny"], "ssm_ngroups": 2, "learned_selection": False})  # tp > 1 refuses it
    full = {n: p.detach() for n, p in BMojoForCausalLM(config).named_parameters()}  # tied head once
    for tp in (1, 2):
        assert memory.rank_parameters(config, tp) == sum(
            t.numel() for t in split_state_dict(full, config, tp)[0].values()
        )
    one, two = (memory.saved_activation_bytes(config, tp, 32) for tp in (1, 2))
    assert 0 < two < one
