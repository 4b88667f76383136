"""scripts/bench_throughput.py prints what each model builds: the issue-11 options of a B'MOJO model included; its
--checkpointing model (activation checkpointing) is the one B'MOJO model, checkpointed. A run loses nothing it
measured: a failed peak-memory child is recorded and the run goes on; a crash leaves the partial results, which
--report-only renders next to (never over) a finished report."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from bmojo import BMojoForCausalLM, preset_config
from bmojo.configuration_bmojo import V0_OPTIONS

_spec = importlib.util.spec_from_file_location(
    "bench_throughput", Path(__file__).parents[1] / "scripts" / "bench_throughput.py"
)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_describe_names_every_option_that_differs_from_the_original_design():
    defaults = BMojoForCausalLM(preset_config("tiny")).config
    changed = sorted(k for k, v in V0_OPTIONS.items() if getattr(defaults, k) != v)
    assert changed  # the defaults are not the original design
    text = bench.describe(BMojoForCausalLM(preset_config("tiny")))
    assert all(f"{k}={getattr(defaults, k)}" in text for k in changed)
    assert "options=v0 " in bench.describe(BMojoForCausalLM(preset_config("tiny", **V0_OPTIONS)))
    ssm_only = bench.describe(BMojoForCausalLM(preset_config("tiny", layers_block_type=["ssm", "ssm"])))
    assert "options=" not in ssm_only  # no attention, no options to name


def test_checkpointing_adds_the_checkpointed_model_with_its_recompute_flops_and_smaller_activations():
    specs = bench.build_specs("tiny", {}, 64, checkpointing=True)
    assert list(specs)[:2] == [bench.REF, bench.CHECKPOINTED]
    assert bench.CHECKPOINTED not in bench.build_specs("tiny", {}, 64)
    plain, checkpointed = specs[bench.REF][0](), specs[bench.CHECKPOINTED][0]()
    assert all(block.gradient_checkpointing for block in checkpointed.model.layers)
    assert not any(block.gradient_checkpointing for block in plain.model.layers)
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randint(3, 64, (1, 64), generator=torch.Generator().manual_seed(0))
    full, kept = bench.activation_bytes(plain, x), bench.activation_bytes(checkpointed, x)
    # what a checkpointed model saves includes each layer's [B, L, d] input (float32), and is much less than all
    inputs = plain.config.num_hidden_layers * 64 * plain.config.hidden_size * 4
    assert inputs < kept < full / 4, (inputs, kept, full)
    config = specs[bench.REF][2]
    base, again = bench.ideal_train_flops(config, 64), bench.ideal_train_flops(config, 64, recompute=True)
    assert base < again < base * 4 / 3  # one more forward, of the layers only (not the embedding / output layer)


def test_selective_recompute_adds_the_recomputing_model_with_its_flops_and_smaller_activations():
    specs = bench.build_specs("tiny", {}, 64, checkpointing=True, selective_recompute=True)
    assert list(specs)[:4] == [bench.REF, bench.CHECKPOINTED, bench.RECOMPUTED, bench.BOTH]
    assert bench.RECOMPUTED not in bench.build_specs("tiny", {}, 64, checkpointing=True)
    assert bench.BOTH not in bench.build_specs("tiny", {}, 64, selective_recompute=True)
    plain, recomputed = specs[bench.REF][0](), specs[bench.RECOMPUTED][0]()
    mixers = [m for m in recomputed.modules() if hasattr(m, "recompute_ops")]
    assert mixers and all(m.recompute_ops == {"attention", "ssd"} for m in mixers)
    assert not any(m.recompute_ops for m in plain.modules() if hasattr(m, "recompute_ops"))
    # the configuration line says how each B'MOJO model gets its backward's tensors
    described = {n: bench.describe(spec[0]()) for n, spec in list(specs.items())[:4]}
    assert described[bench.RECOMPUTED].endswith(" recompute=attention,ssd")
    assert described[bench.CHECKPOINTED].endswith(f" checkpointed_layers={plain.config.num_hidden_layers}")
    layers = plain.config.num_hidden_layers
    assert described[bench.BOTH].endswith(f" checkpointed_layers={layers} recompute=attention,ssd")
    assert all(f" seq_block={plain.config.sequence_block_size} " in d for d in described.values())
    assert "recompute=" not in described[bench.REF] and "checkpointed" not in described[bench.REF]
    recomputed.load_state_dict(plain.state_dict())
    x = torch.randint(3, 64, (1, 64), generator=torch.Generator().manual_seed(0))
    full, kept = bench.activation_bytes(plain, x), bench.activation_bytes(recomputed, x)
    assert kept < 0.8 * full, (kept, full)  # the ops' key sets and chunk matrices are not kept
    config = specs[bench.REF][2]
    base = bench.ideal_train_flops(config, 64)
    ops, layers = (bench.ideal_train_flops(config, 64, **{k: True}) for k in ("recompute_ops", "recompute"))
    assert base < ops < layers  # one more forward of the two ops only: less than one of whole layers
    both = bench.ideal_train_flops(config, 64, recompute=True, recompute_ops=True)
    assert both - layers == pytest.approx(ops - base)  # with both, the layers' recomputation recomputes the ops again


def test_skip_leaves_out_only_the_named_models_and_never_the_targets_models():
    specs = bench.build_specs("tiny", {}, 64)
    kept = bench.skipped(specs, ["full", "mistral"])
    assert set(specs) - set(kept) == {"B'MOJO full-attention case"} | {n for n in specs if "Mistral" in n}
    assert {bench.REF, "B'MOJO SWA case", "transformers Llama", "transformers Mamba2"} <= set(kept)
    assert not any(
        any(name.startswith(p) for p in bench.SKIPPABLE.values())
        for name in (bench.REF, bench.CHECKPOINTED, bench.RECOMPUTED, "B'MOJO SWA case", "transformers Llama",
                     "transformers Mamba2")  # fmt: skip
    )


def test_peak_step_memory_runs_in_its_own_process_and_holds_at_least_the_saved_activations():
    from types import SimpleNamespace

    args = SimpleNamespace(preset="tiny", train_lengths=[256], contexts=[64], checkpointing=False, train_batch=1)
    peak, child_saved = bench.peak_step_bytes(args, {}, bench.REF, 256, 64)
    torch.manual_seed(0)
    model = bench.build_specs("tiny", {}, 256)[bench.REF][0]()
    saved = bench.activation_bytes(model, torch.randint(3, 64, (1, 256)))
    # the child measures what this process measures (same model, same shapes), up to a few small tensors that a
    # process which already ran other models may share or cache (2 KiB of 5.6 MiB seen in the full suite)
    assert abs(child_saved - saved) <= 0.01 * saved, (child_saved, saved)
    # the step's peak holds the saved activations, the gradients and AdamW's two moments (3x the parameters' bytes)
    assert peak >= saved + 3 * 4 * bench.count(model), (peak, saved)
    with pytest.raises(RuntimeError, match="peak memory of nonexistent at L=256 failed"):
        bench.peak_step_bytes(args, {}, "nonexistent", 256, 64)


def test_the_recorded_command_leaves_the_note_text_out():
    assert bench.without_note(["--quick", "--note", "a b", "--out", "d", "--note=c"]) == ["--quick", "--out", "d"]


def test_a_failed_child_process_is_named_in_one_line_whatever_the_way_it_failed():
    killed = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"  # what the out-of-memory killer does
    with pytest.raises(RuntimeError, match=r"^job failed: killed by SIGKILL \(out of memory\?\)$"):
        bench.run_child([sys.executable, "-c", killed], "job")
    with pytest.raises(RuntimeError, match=r"^job failed: killed by SIGTERM$"):
        bench.run_child([sys.executable, "-c", killed.replace("SIGKILL", "SIGTERM")], "job")
    with pytest.raises(RuntimeError, match=r"^job failed: ValueError: bad$"):
        bench.run_child([sys.executable, "-c", "raise ValueError('bad')"], "job")
    with pytest.raises(RuntimeError, match=r"^job failed: exit status 3$"):
        bench.run_child([sys.executable, "-c", "raise SystemExit(3)"], "job")
    assert bench.run_child([sys.executable, "-c", "print('[1, 2]')"], "job") == "[1, 2]\n"


TINY_RUN = ["--preset", "tiny", "--train-lengths", "64", "--contexts", "64", "--threads", "1", "--rounds", "1",
            "--decode-steps", "2", "--skip", "full", "ssm-case", "mistral"]  # fmt: skip


def run_main(monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", ["bench_throughput.py", *argv])
    torch_threads = torch.get_num_threads()
    try:
        bench.main()
    finally:
        torch.set_num_threads(torch_threads)


def test_a_peak_memory_child_that_fails_is_recorded_and_the_run_goes_on(monkeypatch, tmp_path):
    llama = "transformers Llama"

    def peak_step_bytes(args, overrides, name, length, vocab):  # the real one runs a child; here Llama's is killed
        if name == llama:
            raise RuntimeError(f"peak memory of {name} at L={length} failed: killed by SIGKILL (out of memory?)")
        return 3 * 2**20, 2**20

    monkeypatch.setattr(bench, "peak_step_bytes", peak_step_bytes)
    run_main(monkeypatch, *TINY_RUN, "--peak-memory", "--out", str(tmp_path))
    results = json.loads((tmp_path / "throughput.json").read_text())
    failure = "peak memory of transformers Llama at L=64 failed: killed by SIGKILL (out of memory?)"
    assert results["failures"] == [failure]
    assert results["peak_step_bytes"][llama]["64"] is None and results["peak_step_bytes"][bench.REF]["64"] == 3 * 2**20
    assert set(results["train_tokens_per_s"]["1"][llama]) == {"64"}  # the models were measured after the failure
    assert "peak training-step memory B'MOJO/Llama at L=64: not measured (target <= 1.0)" in results["targets"]
    report = (tmp_path / "throughput.md").read_text()
    assert f"## Failed measurements\n\n* {failure}" in report
    assert f"| {llama} | - |" in report and "Partial results" not in report
    assert not (tmp_path / bench.PARTIAL).exists()  # a finished run removes its partial results


def test_a_crash_keeps_what_was_measured_and_report_only_renders_it_next_to_the_finished_report(monkeypatch, tmp_path):
    finished = '{"an earlier": "finished run"}'
    (tmp_path / "throughput.json").write_text(finished)

    def decode_ms_per_token(*args):
        raise KeyboardInterrupt  # Ctrl-C while decoding, after memory and training were measured

    monkeypatch.setattr(bench, "decode_ms_per_token", decode_ms_per_token)
    with pytest.raises(KeyboardInterrupt):
        run_main(monkeypatch, *TINY_RUN, "--out", str(tmp_path))
    partial = json.loads((tmp_path / bench.PARTIAL).read_text())
    models = list(partial["parameters"])
    assert {n: set(v) for n, v in partial["train_tokens_per_s"]["1"].items()} == {n: {"64"} for n in models}
    assert all(partial["activation_bytes"][n]["64"] > 0 for n in models)
    assert partial["decode_ms_per_token"] == {} and "targets" not in partial  # nothing decoded, not finished

    run_main(monkeypatch, "--report-only", str(tmp_path / bench.PARTIAL))
    report = (tmp_path / "throughput.partial.md").read_text()
    assert "**Partial results of an unfinished run**" in report and "![throughput](throughput.partial.png)" in report
    swa = (
        partial["train_tokens_per_s"]["1"][bench.REF]["64"]
        / partial["train_tokens_per_s"]["1"]["B'MOJO SWA case"]["64"]
    )
    assert f"* [1 thr] B'MOJO/own SWA case, worst L: {swa:.2f}x (target >= 0.9)" in report
    assert (tmp_path / "throughput.partial.png").stat().st_size > 0
    assert (tmp_path / "throughput.json").read_text() == finished and not (tmp_path / "throughput.md").exists()


def test_report_only_renders_a_run_killed_after_its_memory_phase(monkeypatch, tmp_path):
    def train_tokens_per_s(*args, **kwargs):
        raise MemoryError  # the first training round at a length that does not fit

    monkeypatch.setattr(bench, "train_tokens_per_s", train_tokens_per_s)
    with pytest.raises(MemoryError):
        run_main(monkeypatch, *TINY_RUN, "--out", str(tmp_path))
    partial = json.loads((tmp_path / bench.PARTIAL).read_text())
    assert partial["train_tokens_per_s"] == {} and partial["decode_ms_per_token"] == {}
    run_main(monkeypatch, "--report-only", str(tmp_path / bench.PARTIAL))
    report = (tmp_path / "throughput.partial.md").read_text()
    saved = partial["activation_bytes"]
    ratio = saved["transformers Llama"]["64"] / saved[bench.REF]["64"]
    assert f"| transformers Llama | {saved['transformers Llama']['64'] / 2**20:.0f} ({ratio:.2f}×) |" in report
    assert "## Training" not in report and "## Decoding" not in report
    assert (tmp_path / "throughput.partial.png").stat().st_size > 0


@pytest.mark.parametrize(
    "content, why",
    [
        (None, "no such file: {path}"),
        (
            "{not json",
            "{path} is not JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))",
        ),
        (
            "[1, 2]",
            "{path} is not a bench_throughput.py result (no command, preset, parameters, activation_bytes, "
            "train_tokens_per_s, decode_ms_per_token)",
        ),
        (
            '{"command": "x", "preset": "cpu", "parameters": {}}',
            "{path} is not a bench_throughput.py result (no activation_bytes, train_tokens_per_s, decode_ms_per_token)",
        ),
    ],
)
def test_report_only_names_what_is_wrong_with_its_file_in_one_line(monkeypatch, capsys, tmp_path, content, why):
    path = tmp_path / "throughput.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        run_main(monkeypatch, "--report-only", str(path))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("--report-only: " + why.format(path=path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if content is None else ["throughput.json"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--train-lengths", "1024", "0"], "argument --train-lengths: must be at least 1, got 0"),
        (["--threads", "two"], "argument --threads: expected an integer, got 'two'"),
        (["--rounds", "-1"], "argument --rounds: must be at least 1, got -1"),
        (["--contexts", "1.5"], "argument --contexts: expected an integer, got '1.5'"),
        (["--out", "pyproject.toml"], "--out: pyproject.toml is a file, not a folder"),
        (["--sequence-block-size", "0"],
         "argument --sequence-block-size: expected a positive integer or none, got '0'"),
    ],
)
def test_bad_arguments_stop_the_run_with_one_line_naming_the_flag(monkeypatch, capsys, argv, message):
    monkeypatch.chdir(Path(__file__).parents[1])
    with pytest.raises(SystemExit) as exit_info:
        run_main(monkeypatch, *argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"bench_throughput.py: error: {message}"


def test_the_peak_memory_children_fix_glibcs_mmap_threshold(monkeypatch):
    """``mallopt`` accepts the setting (glibc; it answers 0 to an unknown parameter; asked in a child process, so
    that this one keeps its allocator), and the child sets it before its model exists."""
    import subprocess

    load = (f"import importlib.util as u; s = u.spec_from_file_location('b', {bench.__file__!r}); "
            "b = u.module_from_spec(s); s.loader.exec_module(b); print(b.fix_mmap_threshold())")
    assert subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, check=True).stdout.split()[
        -1] == "True"
    order = []
    monkeypatch.setattr(bench, "fix_mmap_threshold", lambda: order.append("threshold"))
    real = bench.build_specs
    monkeypatch.setattr(bench, "build_specs", lambda *a, **kw: order.append("model") or real(*a, **kw))
    bench.peak_step_child("tiny", {}, 64, False, bench.REF, 32, 1, 64)
    assert order == ["threshold", "model"]


@pytest.mark.parametrize("value, expected", [(["none"], None), (["64"], 64), ([], 512)])
def test_sequence_block_size_reaches_every_model_of_ours_and_its_configuration_line(monkeypatch, value, expected):
    """``--sequence-block-size`` overrides our models' configuration (the peak-memory children get the same
    overrides); transformers' models do not have it."""
    built = {}
    real = bench.build_specs

    def capture(preset, overrides, *a, **kw):
        specs = real(preset, overrides, *a, **kw)
        built.update({n: bench.describe(f()) for n, (f, kind, _) in specs.items() if kind == "ours"})
        raise SystemExit(0)  # stop before measuring

    monkeypatch.setattr(bench, "build_specs", capture)
    with pytest.raises(SystemExit):
        run_main(monkeypatch, "--preset", "tiny", "--train-lengths", "64", "--contexts", "64", *(
            ["--sequence-block-size", *value] if value else []))
    assert built and all(f" seq_block={expected} " in line for line in built.values())


@pytest.fixture
def counted_compile(monkeypatch):
    """``torch.compile`` with dynamo's frame counter as its backend: the graphs run eagerly (no inductor build in
    the tests) and every compilation is counted."""
    from torch._dynamo.testing import CompileCounter

    counter, real = CompileCounter(), torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real(model, backend=counter, **kw))
    torch._dynamo.reset()
    yield counter
    torch._dynamo.reset()


def test_compile_adds_compiled_bmojo_and_llama_that_compile_in_the_warm_up_not_in_the_timed_rounds(
    monkeypatch, counted_compile
):
    specs = bench.build_specs("tiny", {}, 64, compile_models=True)
    assert list(specs)[-2:] == [bench.COMPILED[bench.REF], bench.COMPILED[bench.LLAMA]]
    assert bench.COMPILED[bench.REF] not in bench.build_specs("tiny", {}, 64)
    for eager, compiled in bench.COMPILED.items():
        factory, kind, config = specs[compiled]
        model = factory()
        assert kind == "compiled" and config is specs[eager][2] and hasattr(model, "_orig_mod")
        assert type(model._orig_mod) is type(specs[eager][0]()) and bench.count(model) == bench.count(specs[eager][0]())
    models = {name: specs[name][0]() for name in (bench.REF, bench.COMPILED[bench.REF])}
    frames = []  # compilations so far, after each training step of the compiled model
    real_step = bench.train_step
    monkeypatch.setattr(
        bench,
        "train_step",
        lambda model, *a: real_step(model, *a) or (model is models[bench.COMPILED[bench.REF]] and frames.append(
            counted_compile.frame_count
        )),
    )
    bench.train_tokens_per_s(models, 64, 1, 3, 64, warm_at_length={bench.COMPILED[bench.REF]})
    assert len(frames) == 4 and frames[0] > 0 and frames == frames[:1] * 4  # compiled once, in the warm-up
    frames.clear()
    torch._dynamo.reset()  # the old warm-up, at [1, 256]: the first timed round would compile again
    bench.train_tokens_per_s(models, 64, 1, 3, 64)
    assert frames[1] > frames[0]


def test_a_compile_run_trains_the_compiled_models_at_every_thread_count_and_measures_nothing_else(
    monkeypatch, tmp_path, counted_compile
):
    frames_at_reset, threads_at_reset = [], []  # compilations so far and inductor's thread count, at each reset
    real_reset = torch._dynamo.reset
    monkeypatch.setattr(torch._inductor.config.cpp, "threads", torch._inductor.config.cpp.threads)  # restored after

    def reset():
        frames_at_reset.append(counted_compile.frame_count)
        threads_at_reset.append(torch._inductor.config.cpp.threads)
        real_reset()

    monkeypatch.setattr(torch._dynamo, "reset", reset)
    run_main(monkeypatch, *TINY_RUN, "--threads", "1", "2", "--compile", "--out", str(tmp_path))
    result = json.loads((tmp_path / "throughput.json").read_text())
    compiled = list(bench.COMPILED.values())
    # compiled again at each thread count, for that thread count
    assert threads_at_reset == [1, 2] and frames_at_reset[0] < frames_at_reset[1] < counted_compile.frame_count
    assert result["versions"] == {"torch": torch.__version__, "transformers": __import__("transformers").__version__}
    for threads in ("1", "2"):
        assert all(result["train_tokens_per_s"][threads][n]["64"] > 0 for n in compiled)
        assert not set(compiled) & set(result["decode_ms_per_token"][threads])
    assert all(result["activation_bytes"][n] == {"64": None} for n in compiled)
    assert result["configs"][bench.COMPILED[bench.REF]] == result["configs"][bench.REF]
    report = (tmp_path / "throughput.md").read_text()
    assert f"| {compiled[0]} | - |" in report  # its memory cell: not measured


def test_the_targets_name_the_compiled_pairs_ratio_next_to_the_eager_one():
    tps = {bench.REF: 50.0, bench.LLAMA: 100.0, bench.COMPILED[bench.REF]: 60.0, bench.COMPILED[bench.LLAMA]: 150.0}
    train = {name: {"2048": value} for name, value in tps.items()}
    lines = bench.targets(
        {"train_tokens_per_s": {"1": train}, "decode_ms_per_token": {}, "activation_bytes": {bench.REF: {}}}
    )
    assert "[1 thr] training tokens/s B'MOJO/Llama at L=2048: 0.50x (target >= 1.0): missed" in lines
    both = "[1 thr] training tokens/s B'MOJO/Llama at L=2048, both torch.compile: 0.40x (target >= 1.0): missed"
    assert both in lines
