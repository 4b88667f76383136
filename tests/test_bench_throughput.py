"""scripts/bench_throughput.py prints what each model builds: the issue-11 options of a B'MOJO model included."""

import importlib.util
from pathlib import Path

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
