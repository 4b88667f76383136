"""scripts/bench_throughput.py prints what each model builds: the issue-11 options of a B'MOJO model included; its
--checkpointing model (activation checkpointing) is the one B'MOJO model, checkpointed."""

import importlib.util
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


def test_skip_leaves_out_only_the_named_models_and_never_the_targets_models():
    specs = bench.build_specs("tiny", {}, 64)
    kept = bench.skipped(specs, ["full", "mistral"])
    assert set(specs) - set(kept) == {"B'MOJO full-attention case"} | {n for n in specs if "Mistral" in n}
    assert {bench.REF, "B'MOJO SWA case", "transformers Llama", "transformers Mamba2"} <= set(kept)
    assert not any(any(name.startswith(p) for p in bench.SKIPPABLE.values()) for name in
                   (bench.REF, bench.CHECKPOINTED, "B'MOJO SWA case", "transformers Llama", "transformers Mamba2"))


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
