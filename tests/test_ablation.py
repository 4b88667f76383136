"""The ablation driver: equal parameters, state bytes, resumable runs, failed-run records, summary statistics."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from filelock import FileLock

from bmojo.evals import ablation as A
from bmojo.modeling_bmojo import BMojoForCausalLM
from support import Killed, count_training_steps, die_after_saving

QUICK = replace(A.STUDIES["recall"]["settings"], **A.QUICK)


@pytest.mark.parametrize("study", ["recall", "lm"])
def test_every_variant_has_the_base_bmojos_parameter_count(study):
    s = A.STUDIES[study]["settings"]
    target = A.parameter_count(A.make_config(s, A.VARIANTS["bmojo_v0"]))  # the base: the original design
    for name, overrides in A.VARIANTS.items():
        config = A.matched_config(s, overrides)
        assert 0.98 * target <= A.parameter_count(config) <= 1.02 * target, name
    transformer = A.matched_config(s, A.VARIANTS["transformer"])
    assert transformer.window_size >= s.seq_len * (s.eval_multiple if study == "lm" else 1)  # full attention
    assert set(A.matched_config(s, A.VARIANTS["mamba2"]).layers_block_type) == {"ssm"}
    assert A.matched_config(s, A.VARIANTS["bmojo_f"]).memory_size == 0


# The issue-11 fields before the defaults changed (written out, not taken from the code under test).
ORIGINAL = dict(
    selection_score="key_prediction",
    learned_selection=False,
    memory_score_decay=1.0,
    memory_admission="chunk",
    memory_reset_at_document=False,
    memory_per_kv_head=False,
    eidetic_key_distance="window",
    fading_self_key=False,
    key_set_bias=False,
    key_set_bias_init=0.0,
)
# What each variant set on top of those defaults then (ablation.py at 4cea7d3).
BEFORE = {
    "bmojo_v0": {},
    "bmojo_new": dict(
        eidetic_key_distance="zero",
        fading_self_key=True,
        key_set_bias=True,
        learned_selection=True,
        memory_admission="window_exit",
    ),
    "bmojo_key0": dict(eidetic_key_distance="zero"),
    "bmojo_random": dict(selection_score="random"),
    "bmojo_f": dict(memory_size=0),
    "mamba2": dict(layers_block_type="ssm", use_fading=False, memory_size=0),
}


@pytest.mark.parametrize("study", ["mqar", "lm"])
@pytest.mark.parametrize("variant", sorted(BEFORE))
def test_variants_resolve_to_the_configs_they_had_before_the_defaults_changed(study, variant):
    """The runs on disk stay valid: every field of the resolved config, the widened MLP included, is as before."""
    s = A.STUDIES[study]["settings"]
    # the matching as it was: widen the MLP (steps of 8) until 98% of the original design's parameter count
    target = A.parameter_count(A.make_config(s, ORIGINAL))
    before = A.make_config(s, dict(ORIGINAL, **BEFORE[variant]))
    while A.parameter_count(before) < 0.98 * target:
        before = A.make_config(s, dict(ORIGINAL, **BEFORE[variant]), before.intermediate_size + 8)
    assert A.matched_config(s, A.VARIANTS[variant]).to_dict() == before.to_dict()


def test_v0_is_the_original_design_and_new_is_the_defaults():
    assert A.V0 == ORIGINAL
    default = A.BMojoConfig()
    assert {name: getattr(default, name) for name in A.OPTIONS} == dict(ORIGINAL, **A.NEW)
    assert A.VARIANTS["bmojo_new"] == {}


def test_every_single_option_variant_is_v0_plus_one_option():
    s = A.STUDIES["mqar"]["settings"]
    for name, overrides in A.VARIANTS.items():
        if name.startswith("bmojo_new"):
            continue
        config = A.matched_config(s, overrides)
        changed = {o for o in A.OPTIONS if getattr(config, o) != ORIGINAL[o]}
        assert len(changed) <= 1 and changed == set(overrides) & changed, (name, changed)
        assert (name in ("bmojo_v0", "bmojo_f", "mamba2", "swa", "transformer")) == (not changed), name


def test_run_files_from_before_the_new_defaults_are_reused_and_new_ones_name_every_option(tmp_path):
    variants, lrs, seeds = ["bmojo_v0", "bmojo_key0"], [1e-3], [0]
    A.run_study(QUICK, variants, lrs, seeds, tmp_path)
    for name in variants:
        path = A.run_path(tmp_path, QUICK, name, 1e-3, 0)
        record = json.loads(path.read_text())
        assert set(A.OPTIONS) <= set(record["spec"]["overrides"])  # the model a file trained, whatever the defaults
        # as the run file was written before: only the options the variant set then
        record["spec"]["overrides"] = BEFORE[name]
        path.write_text(json.dumps(record))
    _, todo = A.plan(QUICK, variants, lrs, seeds, tmp_path)
    assert todo == []
    # a file of another model under the same name is refused (bmojo_new's options under bmojo_v0's name)
    path = A.run_path(tmp_path, QUICK, "bmojo_v0", 1e-3, 0)
    record = json.loads(path.read_text())
    record["spec"]["overrides"] = BEFORE["bmojo_new"]
    path.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="was run with other settings"):
        A.plan(QUICK, variants, lrs, seeds, tmp_path)


@pytest.mark.parametrize("variant", ["mamba2", "swa", "transformer", "bmojo_f", "bmojo_v0"])
def test_state_bytes_are_the_decoding_states_tensors(variant):
    config = A.matched_config(QUICK, A.VARIANTS[variant])
    model = BMojoForCausalLM(config).eval()
    with torch.no_grad():
        cache = model(input_ids=torch.randint(3, 100, (1, 24)), use_cache=True).cache
    tensors = [t for layer in cache.layers for t in layer.tensors().values()] + [cache.positions]
    assert A.state_bytes(config) == sum(t.numel() * t.element_size() for t in tensors)
    if variant == "mamba2":  # N * P * H fp32 per layer, plus the convolution tail and the position
        ssm = config.ssm_state_size * config.ssm_head_dim * config.ssm_num_heads * 4
        conv = (config.ssm_inner_size + 2 * config.ssm_state_size) * (config.ssm_conv_kernel - 1) * 4
        assert A.state_bytes(config) == config.num_hidden_layers * (ssm + conv) + 8


def test_capacity_family_sizes_grow_with_their_knob():
    s = A.STUDIES["capacity"]["settings"]
    for members in A.CAPACITY.values():
        sizes = [A.state_bytes(A.make_config(s, o)) for o in members.values()]
        assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)


def test_a_second_invocation_skips_finished_runs_and_redoes_a_partial_one(tmp_path):
    variants, lrs, seeds = ["mamba2", "bmojo_v0"], [1e-3], [0, 1]
    records = A.run_study(QUICK, variants, lrs, seeds, tmp_path)
    assert len(records) == 4 and {r["status"] for r in records} == {"ok"}
    _, todo = A.plan(QUICK, variants, lrs, seeds, tmp_path)
    assert todo == []
    assert A.run_study(QUICK, variants, lrs, seeds, tmp_path) == []  # nothing run again
    partial = A.run_path(tmp_path, QUICK, "bmojo_v0", 1e-3, 1)
    partial.write_text(partial.read_text()[:50])  # a run killed while writing (no atomic rename)
    _, todo = A.plan(QUICK, variants, lrs, seeds, tmp_path)
    assert [t[1] for t in todo] == [str(partial)]
    redone = A.run_study(QUICK, variants, lrs, seeds, tmp_path)
    assert len(redone) == 1 and A.read_run(partial)["status"] == "ok"
    # more seeds later: only the new runs are planned
    _, todo = A.plan(QUICK, variants, lrs, [0, 1, 2], tmp_path)
    assert sorted(json.loads(json.dumps(t[0]))["seed"] for t in todo) == [2, 2]
    with pytest.raises(ValueError, match="was run with other settings; use another --out"):
        A.plan(replace(QUICK, steps=5), variants, lrs, seeds, tmp_path)


def test_a_run_held_or_finished_by_another_process_is_skipped_not_trained_again(tmp_path, monkeypatch, capsys):
    from filelock import FileLock

    variants, lrs, seeds = ["mamba2"], [1e-3], [0, 1]
    _, todo = A.plan(QUICK, variants, lrs, seeds, tmp_path)  # planned before the other process acts
    held, other = (Path(path) for _, path in todo)
    trained = []
    real = A._train_and_write
    monkeypatch.setattr(A, "_train_and_write", lambda spec, path: trained.append(path) or real(spec, path))
    # seed 0: another study holds the run's lock (a separate open file: flock refuses it in this process too)
    with FileLock(held.with_name(f".{held.name}.lock")):
        record = A.execute(*todo[0])
    assert record == {"status": "skipped", "reason": "another process is running it", "spec": todo[0][0]}
    assert trained == [] and not held.exists()
    # seed 1: another study finished it after this one planned; its file is left as it was
    A.execute(*todo[1])
    written = other.read_text()
    assert A.execute(*todo[1])["reason"] == "another process finished it" and other.read_text() == written
    assert trained == [other]
    # run_study with the stale plan while seed 0 is still held elsewhere: nothing trained, the summary's gap named
    monkeypatch.setattr(A, "plan", lambda *args: ({}, todo))
    with FileLock(held.with_name(f".{held.name}.lock")):
        assert A.run_study(QUICK, variants, lrs, seeds, tmp_path) == []
    assert "1 runs were still being trained by another process: the summary written now lacks them" in (
        capsys.readouterr().out
    )
    # again, the lock free: seed 0 runs, seed 1 is skipped and not returned
    records = A.run_study(QUICK, variants, lrs, seeds, tmp_path)
    assert [r["spec"]["seed"] for r in records] == [0] and trained == [other, held]
    assert A.read_run(held)["status"] == "ok"
    # a run another process finished with other settings (same path): reported failed, its file left alone
    written = held.read_text()
    record = A.execute(dict(todo[0][0], lr=0.5), todo[0][1])
    assert record["status"] == "failed" and "was run with other settings by another process" in record["error"]
    assert held.read_text() == written and trained == [other, held]


def test_summaries_are_written_one_study_process_at_a_time(tmp_path, monkeypatch):
    import threading

    import matplotlib.figure  # noqa: F401 (imported before timing: the summary's first import is slow)
    from filelock import FileLock

    A.run_study(QUICK, ["mamba2"], [1e-3], [0], tmp_path)
    reads = []
    real = A.load_records
    monkeypatch.setattr(A, "load_records", lambda *args: reads.append(1) or real(*args))
    with FileLock(tmp_path / QUICK.study / ".summary.lock"):  # another study process writing its summary
        writer = threading.Thread(target=A.write_summary, args=(tmp_path, QUICK, "cmd"))
        writer.start()
        writer.join(timeout=2)
        assert writer.is_alive() and reads == []  # waits, without reading the runs
    writer.join(timeout=60)
    assert reads == [1] and "mamba2" in (tmp_path / QUICK.study / "summary.md").read_text()


def test_a_failing_run_is_recorded_and_the_study_moves_on(tmp_path, monkeypatch):
    monkeypatch.setitem(A.ALL_VARIANTS, "broken", {"memory_size": -1})
    records = A.run_study(QUICK, ["broken", "swa"], [1e-3], [0], tmp_path)
    by = {r["spec"]["variant"]: r for r in records}
    assert by["swa"]["status"] == "ok"
    assert by["broken"]["status"] == "failed"
    assert by["broken"]["error"] == "ValueError: memory_size must be a non-negative integer, got -1"
    assert A.read_run(A.run_path(tmp_path, QUICK, "broken", 1e-3, 0))["status"] == "failed"
    _, todo = A.plan(QUICK, ["broken", "swa"], [1e-3], [0], tmp_path)
    assert [t[0]["variant"] for t in todo] == ["broken"]  # a failed run is tried again next time
    summary = A.write_summary(tmp_path, QUICK, "cmd")
    assert list(summary["variants"]) == ["swa"] and summary["failed"][0]["variant"] == "broken"
    assert "broken lr=0.001 seed=0: ValueError" in (tmp_path / "recall" / "summary.md").read_text()


def test_an_option_that_changes_nothing_fails_the_run(monkeypatch):
    # innovation_loss_weight changes the loss only: neither parameters nor logits
    monkeypatch.setattr(A, "OPTIONS", ("innovation_loss_weight",))
    with pytest.raises(RuntimeError, match=r"innovation_loss_weight=0.5 changes nothing in this code"):
        A.check_changes_model(A.make_config(QUICK, {"innovation_loss_weight": 0.5}), QUICK.seq_len)
    monkeypatch.setattr(A, "OPTIONS", ("rope_theta",))  # changes the logits: accepted
    A.check_changes_model(A.make_config(QUICK, {"rope_theta": 77.0}), QUICK.seq_len)


def _record(variant, lr, seed, val, test, status="ok"):
    spec = {"variant": variant, "lr": lr, "seed": seed}
    return {
        "status": status,
        "spec": spec,
        "val_score": val,
        "test": {"a": test},
        "parameters": 1,
        "state_bytes": 2,
        "seconds": 3.0,
        "error": "E",
    }


def test_summary_picks_the_best_mean_validation_lr_and_reports_test_mean_and_sample_std():
    records = [
        _record("x", 0.1, 0, 0.9, 0.10),
        _record("x", 0.1, 1, 0.1, 0.20),
        _record("x", 0.1, 2, 0.2, 0.30),
        _record("x", 0.2, 0, 0.5, 0.5),
        _record("x", 0.2, 1, 0.5, 0.7),
        _record("x", 0.2, 2, 0.5, 0.9),
    ]  # lr 0.1 has the best single seed (0.9) but the worse mean (0.4 < 0.5)
    got = A.summarize(records, lower_is_better=False)["variants"]["x"]
    assert got["best_lr"] == 0.2 and got["seeds"] == [0, 1, 2]
    assert got["test"]["a"]["mean"] == pytest.approx(0.7) and got["test"]["a"]["std"] == pytest.approx(0.2)
    assert got["test"]["a"]["std"] == pytest.approx(np.std([0.5, 0.7, 0.9], ddof=1))
    lower = A.summarize(records, lower_is_better=True)["variants"]["x"]
    assert lower["best_lr"] == 0.1 and lower["test"]["a"]["mean"] == pytest.approx(0.2)
    assert A.mean_std([0.4]) == (0.4, 0.0)
    # each seed's value at the best lr, in the order of "seeds": what a mean over seeds that do and do not learn hides
    shuffled = A.summarize(records[::-1], lower_is_better=False)["variants"]["x"]
    assert shuffled["seeds"] == [0, 1, 2] and shuffled["test_by_seed"] == {"a": [0.5, 0.7, 0.9]}



def test_an_lr_run_on_more_seeds_is_compared_on_the_seeds_every_lr_has(capsys):
    # more seeds added at one lr later must not decide the lr: lr 0.2's extra seeds 3, 4 raise its mean over all
    # of its seeds (0.58) above lr 0.1's (0.5), but on the common seeds 0-2 it is worse (0.4)
    records = [_record("x", 0.1, s, 0.5, 0.1) for s in (0, 1, 2)]
    records += [_record("x", 0.2, s, val, 0.2) for s, val in zip(range(5), (0.4, 0.4, 0.4, 0.9, 0.9))]
    got = A.summarize(records, lower_is_better=False)["variants"]["x"]
    assert got["best_lr"] == 0.1 and got["lr_choice_seeds"] == [0, 1, 2]
    assert got["val_by_lr"] == {"0.1": pytest.approx(0.5), "0.2": pytest.approx(0.4)}
    assert got["seeds_by_lr"] == {"0.1": [0, 1, 2], "0.2": [0, 1, 2, 3, 4]}
    # and the other way round: extra seeds that lower the chosen lr's mean do not unchoose it, and its test
    # metrics use every seed it has
    records = [_record("x", 0.1, s, val, t) for s, val, t in zip(range(5), (0.5, 0.5, 0.5, 0, 0), (1, 2, 3, 4, 5))]
    records += [_record("x", 0.2, s, 0.4, 0.2) for s in (0, 1, 2)]
    got = A.summarize(records, lower_is_better=False)["variants"]["x"]
    assert got["best_lr"] == 0.1 and got["seeds"] == [0, 1, 2, 3, 4] and got["lr_choice_seeds"] == [0, 1, 2]
    assert got["test"]["a"]["mean"] == pytest.approx(3.0) and got["test_by_seed"]["a"] == [1, 2, 3, 4, 5]
    # lrs that share no seed: each lr's own mean, said once
    apart = [_record("x", 0.1, 0, 0.5, 0.1), _record("x", 0.2, 1, 0.6, 0.2)]
    got = A.summarize(apart, lower_is_better=False)["variants"]["x"]
    assert got["best_lr"] == 0.2 and got["lr_choice_seeds"] is None
    assert capsys.readouterr().out == "x: its lrs share no seed; the best lr is chosen on each lr's own seeds\n"


def test_a_summary_says_when_a_variants_lrs_have_different_seeds(tmp_path):
    common = ["--study", "mqar", "--quick", "--out", str(tmp_path), "--variants", "mamba2"]
    A.main([*common, "--lrs", "0.003", "--seeds", "0", "1"])
    A.main([*common, "--lrs", "0.01", "--seeds", "0"])
    A.main([*common, "--lrs", "0.003", "0.01", "--seeds", "0", "1", "--summary-only"])
    md = (tmp_path / "mqar" / "summary.md").read_text()
    summary = json.loads((tmp_path / "mqar" / "summary.json").read_text())["variants"]["mamba2"]
    assert summary["lr_choice_seeds"] == [0]
    assert (
        "mamba2 was run on different seeds per lr (lr 0.003: seeds 0 1; lr 0.01: seeds 0): its lr is chosen on the "
        "seeds all of them have (0)." in md
    )
    A.main([*common, "--lrs", "0.01", "--seeds", "1"])  # now every lr has seeds 0, 1: no such line
    A.main([*common, "--lrs", "0.003", "0.01", "--seeds", "0", "1", "--summary-only"])
    assert "different seeds per lr" not in (tmp_path / "mqar" / "summary.md").read_text()

def test_a_summary_lists_each_seeds_accuracy_under_its_mean(tmp_path):
    common = ["--study", "mqar", "--quick", "--lrs", "0.003", "--out", str(tmp_path), "--variants", "mamba2", "swa"]
    A.main([*common, "--seeds", "0", "1"])
    summary = json.loads((tmp_path / "mqar" / "summary.json").read_text())
    md = (tmp_path / "mqar" / "summary.md").read_text()
    pairs = A.STUDIES["mqar"]["settings"].tasks[0][2]
    for name in ("mamba2", "swa"):
        for seed in (0, 1):
            run = A.read_run(
                A.run_path(tmp_path, A.replace(A.STUDIES["mqar"]["settings"], **A.QUICK), name, 3e-3, seed)
            )
            assert (
                summary["variants"][name]["test_by_seed"][f"mqar kv={pairs[0]}"][seed]
                == run["test"][f"mqar kv={pairs[0]}"]
            )
            cells = " | ".join(f"{run['test'][f'mqar kv={p}']:.3f}" for p in pairs)
            assert f"| {name} | {seed} | {cells} |" in md


def test_cli_screen_writes_tables_and_plots(tmp_path):
    A.main(["--quick", "--screen", "--variants", "mamba2", "bmojo_v0", "--lrs", "0.001", "--out", str(tmp_path)])
    folder = tmp_path / "recall"
    table = (folder / "summary.md").read_text()
    assert "python -m bmojo.evals.ablation --quick --screen" in table and "| bmojo_v0 |" in table
    for task, _, _ in QUICK.tasks:
        assert (folder / f"{task}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((folder / "summary.json").read_text())
    keys = {f"{t} kv={p}" for t, _, pairs in QUICK.tasks for p in pairs}
    assert set(summary["variants"]["mamba2"]["test"]) == keys
    assert all(0 <= v["mean"] <= 1 for v in summary["variants"]["mamba2"]["test"].values())


def test_capacity_plot_labels_name_each_points_knob_value():
    for family, members in A.CAPACITY.items():
        for name, overrides in members.items():
            label = A.capacity_label(family, name)
            if family == "Transformer":
                assert label == ""
                continue
            letter = family[family.index("(") + 1 : -1]  # "Mamba-2 (N)" -> "N"
            assert int(label) == overrides[A.CAPACITY_KNOBS[family]] and name.endswith(f"_{letter}{label}")


def test_capacity_study_plots_accuracy_against_state_bytes(tmp_path):
    A.main(
        [
            "--study",
            "capacity",
            "--quick",
            "--screen",
            "--lrs",
            "0.001",
            "--out",
            str(tmp_path),
            "--variants",
            "mamba2_N8",
            "swa_W8",
            "bmojo_new_M4",
            "bmojo_new_M8",
            "bmojo_new_M64",
        ]
    )
    summary = json.loads((tmp_path / "capacity" / "summary.json").read_text())
    assert summary["variants"]["bmojo_new_M8"]["state_bytes"] > summary["variants"]["bmojo_new_M4"]["state_bytes"]
    # the point whose state bytes count slots a row never fills is named under Notes (and drawn open)
    notes = (tmp_path / "capacity" / "summary.md").read_text().split("## Notes")[1]
    assert "bmojo_new_M64: its memory never fills" in notes and "bmojo_new_M8" not in notes
    assert (tmp_path / "capacity" / "capacity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lm_study_reports_perplexity_at_both_lengths_and_memory_off(tmp_path):
    data = tmp_path / "salad.txt"
    rng = np.random.default_rng(0)
    words = ["def", "return", "self", "import", "(x)", ":", "\n    "]
    data.write_text(" ".join(rng.choice(words, size=20000)))
    s = replace(A.STUDIES["lm"]["settings"], **A.QUICK_LM, lm_data=str(data))
    (bmojo,) = A.run_study(s, ["bmojo_v0"], [1e-3], [0], tmp_path)
    assert bmojo["status"] == "ok", bmojo.get("traceback")
    long = s.eval_multiple * s.seq_len
    assert set(bmojo["test"]) == {
        f"ppl@{s.seq_len}",
        f"ppl@{long}",
        f"ppl@{s.seq_len} memory off",
        f"ppl@{long} memory off",
        f"memory off cost @{long} (%)",
    }
    assert all(1 < bmojo["test"][k] < 300 for k in bmojo["test"] if k.startswith("ppl"))
    assert bmojo["val_score"] == bmojo["val"][f"ppl@{s.seq_len}"]


@pytest.mark.parametrize("study", ["long_gap", "overwrite", "phonebook", "mqar"])
def test_single_task_studies_train_and_test_only_their_task(study):
    task = study
    s = A.STUDIES[study]["settings"]
    assert s.study == study and [t for t, _, _ in s.tasks] == [task]
    # the same shape and budget as the MQAR study: only the task differs
    assert replace(s, study="mqar", tasks=A.STUDIES["mqar"]["settings"].tasks) == A.STUDIES["mqar"]["settings"]


def _study_after_its_first_run(tmp_path, *args):
    """A 16-run study (MQAR, --quick, mamba2, lrs 1e-3 and 3e-3, seeds 0-7, then ``args``) in a process group of its
    own, as a terminal's foreground job, returned once its first run file is written: (process, log, a function
    counting its run files)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    argv = ["--study", "mqar", "--quick", "--lrs", "0.001", "0.003", "--seeds", *map(str, range(8))]
    argv += ["--variants", "mamba2", *args, "--out", str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    log = tmp_path / "study.log"
    with open(log, "w") as sink:  # a file, not a pipe: the progress bar must never block the study
        study = subprocess.Popen(
            [sys.executable, "-m", "bmojo.evals.ablation", *argv], env=env, stdout=sink, stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # not inherited as ignored (nohup, &)
        )  # fmt: skip

    def written():
        return len(list((tmp_path / "mqar").glob("*/*.json")))

    deadline = time.time() + 300
    while written() == 0 and study.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert study.poll() is None, log.read_text()[-2000:]  # still running: 16 runs take far longer
    return study, log, written


def test_killing_a_study_stops_its_workers_instead_of_leaving_them_to_train_the_queued_runs(tmp_path):
    """A study with --jobs 2 killed outright (SIGKILL, or a SIGTERM that skips its cleanup) leaves no worker behind:
    at most the runs in progress when it died may still land, none of the runs queued to its pool (there are always
    a few: ProcessPoolExecutor feeds each worker ahead). Before the watcher, orphans trained the queue unseen."""
    import signal
    import time

    study, log, written = _study_after_its_first_run(tmp_path, "--jobs", "2")
    study.send_signal(signal.SIGKILL)
    study.wait()
    at_kill = written()
    time.sleep(5)  # the workers notice within half a second
    settled = written()
    time.sleep(10)
    final = written()
    # the two runs in progress at most; nothing queued
    assert final == settled <= at_kill + 2 < 16, (at_kill, settled, final, log.read_text()[-2000:])


@pytest.mark.parametrize("jobs, presses", [(1, 1), (2, 1), (2, 2)])
def test_ctrl_c_stops_a_study_at_once_with_one_line_and_the_same_command_resumes_it(tmp_path, jobs, presses):
    """Ctrl-C in a terminal (SIGINT to the study's whole process group; pressed once, or twice in quick
    succession): the study ends within seconds with exit status 130 and one line, no traceback, no process left, no
    run landing afterwards. Before, with --jobs 2 the study process waited (silently, its bar frozen) while its
    workers trained every queued run."""
    import os
    import signal
    import time

    study, log, written = _study_after_its_first_run(tmp_path, "--steps", "40", "--jobs", str(jobs))
    os.killpg(study.pid, signal.SIGINT)
    if presses == 2:
        time.sleep(0.01)
        os.killpg(study.pid, signal.SIGINT)
    assert study.wait(timeout=30) == 130, log.read_text()[-2000:]
    at_exit = written()
    time.sleep(5)
    with pytest.raises(ProcessLookupError):  # no worker (nor anything else of the study) is left
        os.killpg(study.pid, 0)
    text = log.read_text()
    assert written() == at_exit < 16 and "Traceback" not in text, text[-2000:]
    assert text.rstrip().splitlines()[-1] == (
        f"ablation: interrupted; the finished runs are kept in {tmp_path / 'mqar'} and each run in progress resumes "
        f"from its last save (at most {A.CHECKPOINT_SECONDS:g} s of training lost): run the same command again"
    )
    for lock in (tmp_path / "mqar").glob("*/.*.lock"):  # no run is still held: the rerun trains what is missing
        with FileLock(lock, timeout=0):
            pass
    quick = replace(A.STUDIES["mqar"]["settings"], **dict(A.QUICK, steps=40))
    _, todo = A.plan(quick, ["mamba2"], [0.001, 0.003], range(8), tmp_path)
    assert len(todo) == 16 - at_exit


def test_an_interrupted_pool_stops_its_own_workers_only_and_restores_the_sigint_handler(tmp_path, monkeypatch):
    """run_study called from Python, its caller holding a child process of its own: an interrupt stops the pool's
    workers and no other process, and SIGINT is handled as before afterwards."""
    import multiprocessing
    import os
    import signal
    import time

    bystander = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(60,))
    bystander.start()
    handler = signal.getsignal(signal.SIGINT)

    def interrupted(futures):
        time.sleep(3)  # the workers start meanwhile
        raise KeyboardInterrupt

    monkeypatch.setattr(A, "as_completed", interrupted)
    quick = replace(A.STUDIES["mqar"]["settings"], **A.QUICK)
    try:
        with pytest.raises(KeyboardInterrupt):
            A.run_study(quick, ["mamba2"], [0.001, 0.003], range(4), tmp_path, jobs=2)
        assert bystander.is_alive()
        for worker in multiprocessing.active_children():  # the pool's workers: gone, not merely marked so
            if worker is not bystander:  # (a worker the pool's thread reaped can still be listed, its pid gone)
                with pytest.raises(ProcessLookupError):
                    os.kill(worker.pid, 0)
        assert signal.getsignal(signal.SIGINT) is handler
    finally:
        bystander.kill()
        bystander.join()


def test_ctrl_c_while_the_summary_is_written_is_one_line_that_says_how_to_write_it(tmp_path, monkeypatch, capsys):
    common = ["--study", "mqar", "--quick", "--screen", "--lrs", "0.001", "--variants", "mamba2"]
    common += ["--out", str(tmp_path)]
    A.main(common)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(A, "_write_summary", interrupted)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        A.main(common)
    assert stop.value.code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"ablation: interrupted while writing the summary in {tmp_path / 'mqar'} (the runs are kept): write it again "
        "with the same command and --summary-only"
    )


def test_summary_only_writes_the_command_that_regenerates_the_runs(tmp_path):
    common = ["--study", "recall", "--quick", "--screen", "--lrs", "0.001", "--out", str(tmp_path)]
    A.main([*common, "--variants", "mamba2"])
    A.main([*common, "--summary-only", "--variants", "mamba2"])
    line = next(x for x in (tmp_path / "recall" / "summary.md").read_text().splitlines() if x.startswith("Regenerate"))
    assert "--summary-only" not in line and "--variants mamba2" in line and "--study recall" in line
    # without --variants: the variants found, named (the study's default variants are others)
    A.main([*common, "--variants", "swa"])
    A.main([*common, "--summary-only"])
    line = next(x for x in (tmp_path / "recall" / "summary.md").read_text().splitlines() if x.startswith("Regenerate"))
    expected = f"python -m bmojo.evals.ablation {' '.join(common[:-2])} --out {tmp_path} --variants mamba2 swa"
    assert line == f"Regenerate: `{expected}`"
    assert json.loads((tmp_path / "recall" / "summary.json").read_text())["command"] == expected


def test_a_summary_holds_the_commands_grid_only_and_counts_the_run_files_it_left_out(tmp_path, capsys):
    """Files of another grid in the same folder (an lr added for one variant, a seed added later, a variant the
    command does not name) do not enter the summary of a command that did not ask for them; the union of the grids
    brings them all in."""
    common = ["--study", "mqar", "--quick", "--out", str(tmp_path)]
    A.main([*common, "--lrs", "0.001", "0.003", "--seeds", "0", "1", "--variants", "mamba2"])
    A.main([*common, "--lrs", "0.003", "--seeds", "0", "--variants", "swa"])
    capsys.readouterr()
    A.main([*common, "--lrs", "0.003", "--seeds", "0", "--summary-only"])
    summary = json.loads((tmp_path / "mqar" / "summary.json").read_text())
    assert "3 run files in" in capsys.readouterr().out  # mamba2 at 1e-3 (seeds 0, 1) and at 3e-3 seed 1
    assert {n: (list(v["val_by_lr"]), v["seeds"]) for n, v in summary["variants"].items()} == {
        "mamba2": (["0.003"], [0]),
        "swa": (["0.003"], [0]),
    }
    assert summary["grid"] == {"lrs": [0.003], "seeds": [0]}
    A.main([*common, "--lrs", "0.001", "0.003", "--seeds", "0", "1", "--summary-only"])
    summary = json.loads((tmp_path / "mqar" / "summary.json").read_text())
    assert "outside this command's grid" not in capsys.readouterr().out
    assert sorted(summary["variants"]["mamba2"]["val_by_lr"]) == ["0.001", "0.003"]
    assert summary["variants"]["swa"]["seeds"] == [0]  # a variant keeps the runs it has
    # --variants narrows the summary too (without it: every variant found, as above)
    A.main([*common, "--lrs", "0.001", "0.003", "--seeds", "0", "1", "--summary-only", "--variants", "swa"])
    summary = json.loads((tmp_path / "mqar" / "summary.json").read_text())
    assert list(summary["variants"]) == ["swa"] and summary["grid"]["variants"] == ["swa"]
    assert "4 run files in" in capsys.readouterr().out  # mamba2's four: "... outside this command's grid"
    # a grid (or settings) that matches no run file is an error, and the summary there is left as it was
    before = (tmp_path / "mqar" / "summary.json").read_text()
    for wrong in (["--quick", "--lrs", "0.03"], ["--lrs", "0.003"]):  # an lr typo; the full settings, not --quick
        with pytest.raises(SystemExit, match="no run in .* the summary was not written"):
            A.main(["--study", "mqar", "--out", str(tmp_path), *wrong, "--summary-only"])
    assert "5 run files in" in capsys.readouterr().out  # "... were made with other settings"
    assert (tmp_path / "mqar" / "summary.json").read_text() == before
    A.main([*common, "--lrs", "0.003", "--su"])  # argparse's abbreviation is no part of the Regenerate line either
    command = json.loads((tmp_path / "mqar" / "summary.json").read_text())["command"]
    assert command.endswith("--lrs 0.003 --variants mamba2 swa")  # the variants found, named


def test_predictable_gap_study_puts_every_pair_beyond_what_recency_keeps_and_random_keeps_a_sample():
    from bmojo.evals.coverage import answer_visibility

    s = A.STUDIES["predictable_gap"]["settings"]
    span = s.window + s.memory_size * s.chunk // s.selections_per_chunk  # what recency can hold past the window
    assert s.gap == 64 > span and s.seq_len == 120 and [t for t, _, _ in s.tasks] == ["predictable_gap"]
    sets = A.recall_sets(replace(s, test_examples=24), "test")
    assert list(sets) == ["predictable_gap kv=2", "predictable_gap kv=4", "predictable_gap kv=8"]
    held = {}
    for variant in ("bmojo_new_recency", "bmojo_new_random"):
        torch.manual_seed(0)
        model = BMojoForCausalLM(A.matched_config(s, A.ALL_VARIANTS[variant])).eval()
        held[variant] = 0.0
        for x, y in sets.values():
            for layer in answer_visibility(model, (x, y))["layers"].values():
                assert layer["classes"]["window"]["count"] == 0  # every queried pair is beyond the window
                held[variant] += layer["slots"]["pair_key"] + layer["slots"]["pair_value"]
                if variant == "bmojo_new_recency":  # selection by position alone: no query ever sees a pair token
                    assert layer["classes"]["memory"]["count"] == 0
    assert held["bmojo_new_recency"] == 0 and held["bmojo_new_random"] > 0


def test_predictable_gap_at_32_slots_evicts_and_recency_reaches_the_queried_pair_at_some_queries_only():
    """The M = 32 comparison on predictable-gap rows (docs/eidetic.md) is one of memories that must drop picks: each
    of the three rules fills its 32 slots (a row offers 54), and recency's span past the window (W + M*C/k = 72
    tokens) now exceeds the gap, so its slots hold the queried pair at some queries and at fewer as pairs push the
    queries later — unlike M = 16, where they hold none (test above)."""
    from bmojo.evals.coverage import answer_visibility

    s = A.STUDIES["predictable_gap"]["settings"]
    assert A.memory_slots_used(A.matched_config(s, {"memory_size": 64}), s.seq_len) > 32
    for variant in ("bmojo_new_M32", "bmojo_new_M32_random", "bmojo_new_M32_recency"):
        assert A.memory_slots_used(A.matched_config(s, A.ALL_VARIANTS[variant]), s.seq_len) == 32
        assert A.memory_note(variant, A.matched_config(s, A.ALL_VARIANTS[variant]), s.seq_len) is None
    torch.manual_seed(0)
    model = BMojoForCausalLM(A.matched_config(s, A.ALL_VARIANTS["bmojo_new_M32_recency"])).eval()
    shares = []
    for x, y in A.recall_sets(replace(s, test_examples=50), "test").values():
        layers = list(answer_visibility(model, (x, y))["layers"].values())
        assert all(layer["classes"]["window"]["count"] == 0 for layer in layers)
        shares.append(layers[-1]["classes"]["memory"]["fraction"])
    assert 0 < shares[-1] < shares[0] < 1  # 2 pairs: some queries see their pair; 8 pairs: fewer, not none


@pytest.mark.parametrize("study", ["mqar", "lm"])
def test_every_variant_that_sets_an_option_changes_the_model_in_its_studys_shape(study):
    """The run-time guard (check_changes_model) passes for every variant, so none fails its runs and none sets an
    option that leaves the model as it is with that option at v0's value."""
    s = A.STUDIES[study]["settings"]
    checked = []
    for name, overrides in A.ALL_VARIANTS.items():
        config = A.matched_config(s, overrides)
        A.check_changes_model(config, s.seq_len)
        if any(getattr(config, o) != A.V0.get(o, getattr(A.BMojoConfig(), o)) for o in A.OPTIONS):
            checked.append(name)
    # every default (bmojo_new*) variant sets options away from v0, and so do the single-option ones
    assert {n for n in A.ALL_VARIANTS if n.startswith("bmojo_new")} <= set(checked)
    assert {"bmojo_random", "bmojo_decay", "bmojo_self_key", "bmojo_per_head"} <= set(checked)


def test_memory_slots_used_is_where_a_larger_memory_stops_changing_the_model():
    """Past the slots a row fills, nothing is evicted: a larger memory computes the same logits from the same
    weights, and one slot fewer evicts and changes them (why M = 32 and M = 64 are one model on MQAR's rows)."""

    def config(m):
        return A.make_config(QUICK, {"memory_size": m})

    used = A.memory_slots_used(config(64), QUICK.seq_len)
    assert 0 < used < 64 and A.memory_slots_used(config(used - 1), QUICK.seq_len) == used - 1
    x = torch.randint(3, 128, (2, QUICK.seq_len), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    reference = BMojoForCausalLM(config(used)).eval()
    logits = {}
    for m in (used - 1, used, 64):
        model = BMojoForCausalLM(config(m)).eval()
        model.load_state_dict(reference.state_dict())
        with torch.no_grad():
            logits[m] = model(input_ids=x).logits
    assert torch.equal(logits[used], logits[64]) and not torch.equal(logits[used - 1], logits[used])
    assert A.memory_note("m", config(used - 1), QUICK.seq_len) is None
    assert A.memory_note("m", config(64), QUICK.seq_len) == (
        f"m: its memory never fills in a {QUICK.seq_len}-token row ({used} of 64 slots after the last token): nothing"
        f" is evicted, and any memory_size >= {used} is the same model here"
    )
    assert A.memory_slots_used(A.make_config(QUICK, A.VARIANTS["mamba2"]), QUICK.seq_len) == 0


def test_a_study_says_which_memories_never_fill_before_training_and_in_its_summary(tmp_path, capsys):
    argv = ["--study", "mqar", "--quick", "--screen", "--lrs", "0.001", "--out", str(tmp_path)]
    A.main(argv + ["--variants", "bmojo_new_M4", "bmojo_new_M64"])
    printed = capsys.readouterr().out
    summary = (tmp_path / "mqar" / "summary.md").read_text()
    for text in (printed, summary):
        assert "bmojo_new_M64: its memory never fills in a 64-token row" in text
        assert "bmojo_new_M4: its memory" not in text


def _lm_settings(tmp_path):
    data = tmp_path / "salad.txt"
    words = ["def", "return", "self", "import", "(x)", ":", "\n    "]
    data.write_text(" ".join(np.random.default_rng(0).choice(words, size=20000)))
    return replace(A.STUDIES["lm"]["settings"], **A.QUICK_LM, lm_data=str(data))


def _one_run(s, tmp_path, name):
    """The spec of the defaults' run at lr 3e-3, seed 0, and its file under ``tmp_path/name``."""
    config = A.matched_config(s, A.VARIANTS["bmojo_new"])
    spec = A.run_spec(s, "bmojo_new", A.VARIANTS["bmojo_new"], config, 3e-3, 0)
    return spec, str(A.run_path(tmp_path / name, s, "bmojo_new", 3e-3, 0))


def _die_after_saving(monkeypatch, at_step):
    """The run's process dies right after its save of ``at_step`` (saving after every step)."""
    monkeypatch.setattr(A, "CHECKPOINT_SECONDS", 0.0)
    return die_after_saving(monkeypatch, A, at_step)


RESULT = ("status", "final_loss", "val", "test", "val_score", "parameters", "state_bytes")


@pytest.mark.parametrize("study", ["mqar", "lm"])
def test_a_run_killed_after_a_save_continues_from_it_to_the_uninterrupted_result(study, tmp_path, monkeypatch):
    """Nothing but the steps after the last save is lost: the second attempt trains only the remaining steps
    (counted) and ends with the uninterrupted run's record, bit for bit (recall data is indexed by step; the LM's
    batches come from a numpy stream whose state the save holds)."""
    s = replace(_lm_settings(tmp_path) if study == "lm" else replace(QUICK, study=study), steps=8)
    spec, whole_path = _one_run(s, tmp_path, "whole")
    whole = A.execute(spec, whole_path)  # saves every 2 minutes: none in a run of seconds
    assert whole["status"] == "ok", whole.get("traceback")
    assert "resumed_at_step" not in whole and not A.partial_dir(Path(whole_path)).exists()

    _, path = _one_run(s, tmp_path, "killed")
    real = _die_after_saving(monkeypatch, at_step=5)
    with pytest.raises(Killed):
        A.execute(spec, path)
    partial = A.partial_dir(Path(path))
    assert not Path(path).exists() and [p.name for p in A.list_checkpoints(partial)] == ["step_000005"]  # keep=1
    monkeypatch.setattr(A, "save_checkpoint", real)
    steps = count_training_steps(monkeypatch)
    again = A.execute(spec, path)
    assert again.get("resumed_at_step") == 5, again
    assert len(steps) == 3
    assert {k: again[k] for k in RESULT} == {k: whole[k] for k in RESULT}
    assert not partial.exists()  # removed once the record is written
    assert A.plan(s, ["bmojo_new"], [3e-3], [0], tmp_path / "killed")[1] == []  # and the study counts it done


def test_saves_left_beside_a_finished_run_are_removed_when_a_study_next_plans(tmp_path, monkeypatch):
    """A kill between writing a run's record and removing its saves leaves them behind; nothing reads them again
    (the run is done), so the next plan of that study deletes them instead of leaving them on disk for good."""
    s = replace(QUICK, steps=6)
    spec, path = _one_run(s, tmp_path, "out")
    real = _die_after_saving(monkeypatch, at_step=3)
    with pytest.raises(Killed):
        A.execute(spec, path)
    monkeypatch.setattr(A, "save_checkpoint", real)

    def killed_before_removing(self):
        raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(A.RunCheckpoints, "remove", killed_before_removing)
        with pytest.raises(Killed):
            A.execute(spec, path)
    partial = A.partial_dir(Path(path))
    assert A.read_run(Path(path))["status"] == "ok" and A.list_checkpoints(partial)
    with pytest.raises(ValueError, match="other settings"):  # a folder of other settings is left alone
        A.plan(replace(s, steps=7), ["bmojo_new"], [3e-3], [0], tmp_path / "out")
    assert partial.exists()
    assert A.plan(s, ["bmojo_new"], [3e-3], [0], tmp_path / "out")[1] == []
    assert not partial.exists()


@pytest.mark.parametrize("fault", ["other settings", "damaged", "malformed", "not a folder"])
def test_a_save_that_cannot_be_used_is_deleted_and_the_run_starts_again(fault, tmp_path, monkeypatch, capsys):
    """Whatever is wrong with the save the run finds, the run is neither failed nor continued from it: it starts from
    step 0 (the record equals a fresh run's), and the old save is gone, so this attempt's own saves (at lower steps)
    are kept and a kill after one of them loses only the steps since."""
    s = replace(QUICK, steps=8)
    spec, path = _one_run(s, tmp_path, "out")
    partial = A.partial_dir(Path(path))
    real = _die_after_saving(monkeypatch, at_step=5)
    with pytest.raises(Killed):
        A.execute(spec, path)
    (saved,) = A.list_checkpoints(partial)
    if fault == "other settings":  # the study's settings changed since the save (the same run file name)
        s = replace(s, steps=10)
        spec, _ = _one_run(s, tmp_path, "out")
    elif fault == "damaged":  # the disk damaged the save: its checksums fail
        weights = saved / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    elif fault == "malformed":  # no checksums to catch it, and not the object a save writes
        (saved / "checksums.sha256").unlink()
        (saved / "training_state.json").write_text("[]")
    else:
        A.RunCheckpoints(partial).remove()
        partial.write_text("not a folder")
    monkeypatch.setattr(A, "save_checkpoint", real)
    fresh = A.execute(*_one_run(s, tmp_path, "fresh"))
    capsys.readouterr()
    _die_after_saving(monkeypatch, at_step=2)
    with pytest.raises(Killed):
        A.execute(spec, path)
    assert "not resuming from" in capsys.readouterr().err
    assert [p.name for p in A.list_checkpoints(partial)] == ["step_000002"]  # the old one no longer outranks it
    monkeypatch.setattr(A, "save_checkpoint", real)
    steps = count_training_steps(monkeypatch)
    again = A.execute(spec, path)
    assert again["resumed_at_step"] == 2 and len(steps) == s.steps - 2
    assert {k: again[k] for k in RESULT} == {k: fresh[k] for k in RESULT}


def test_a_save_that_fails_does_not_fail_the_run(tmp_path, monkeypatch, capsys):
    """A full disk (any error of the save) costs resumability, not the run: the record is the uninterrupted one."""
    s = replace(QUICK, steps=8)
    whole = A.execute(*_one_run(s, tmp_path, "whole"))

    def full_disk(*args, **kwargs):
        raise A.BMojoError("cannot save the checkpoint: No space left on device")

    monkeypatch.setattr(A, "CHECKPOINT_SECONDS", 0.0)
    monkeypatch.setattr(A, "save_checkpoint", full_disk)
    spec, path = _one_run(s, tmp_path, "full")
    record = A.execute(spec, path)
    assert record["status"] == "ok", record.get("error")
    assert {k: record[k] for k in RESULT} == {k: whole[k] for k in RESULT}
    assert capsys.readouterr().err.count("cannot save the run's training state") == 1  # once, not every step


@pytest.mark.parametrize("summary_only", [False, True])
def test_an_unknown_variant_is_one_error_line_before_anything_runs(summary_only, tmp_path, capsys):
    argv = ["--study", "mqar", "--quick", "--out", str(tmp_path), "--variants", "mamba2", "mamba3"]
    with pytest.raises(SystemExit) as exit_:
        A.main(argv + ["--summary-only"] * summary_only)
    assert exit_.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err[-1].endswith("error: unknown variant 'mamba3'; choose from " + ", ".join(A.ALL_VARIANTS))
    assert "Traceback" not in "\n".join(err) and not (tmp_path / "mqar").exists()


def test_a_named_variant_without_runs_at_the_grid_is_reported(tmp_path, capsys):
    common = ["--study", "mqar", "--quick", "--screen", "--lrs", "0.003", "--out", str(tmp_path)]
    A.main([*common, "--variants", "mamba2"])
    capsys.readouterr()
    A.main([*common, "--variants", "mamba2", "swa", "--summary-only"])
    assert "no finished run of swa in" in capsys.readouterr().out
    assert list(json.loads((tmp_path / "mqar" / "summary.json").read_text())["variants"]) == ["mamba2"]
