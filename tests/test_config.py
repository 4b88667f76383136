"""Configuration: validation messages, presets, Auto registration."""

import pytest
from transformers import AutoConfig

import bmojo
from bmojo import PRESETS, BMojoConfig, BMojoForCausalLM, preset_config

# core: must also pass on the trn1 stack (torch 2.9 + transformers 4.57); the XLA tier runs it there too.
pytestmark = pytest.mark.core


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(window_size=10, chunk_size=4), r"window_size \(10\) must be a multiple of chunk_size \(4\)"),
        (dict(hidden_size=30, num_attention_heads=4), r"num_attention_heads \(4\) must divide hidden_size \(30\)"),
        (dict(num_attention_heads=4, num_key_value_heads=3), r"num_key_value_heads \(3\) must divide"),
        (dict(layers_block_type=["bmojo", "mamba"]), r"layers_block_type\[1\] is 'mamba': unknown layer type"),
        (dict(layers_block_type=["bmojo"]), r"layers_block_type has 1 entries but num_hidden_layers is 2"),
        (dict(memory_size=4, selections_per_chunk=0), r"selections_per_chunk must be >= 1"),
        (dict(selections_per_chunk=9, chunk_size=4), r"selections_per_chunk \(9\) must not exceed chunk_size \(4\)"),
        (dict(ssm_head_dim=24), r"ssm_head_dim \(24\) must divide"),
        (dict(chunk_size=0), r"chunk_size must be a positive integer, got 0"),
        (dict(vocab_size=-1), r"vocab_size must be a positive integer"),
        (dict(memory_size=-2), r"memory_size must be a non-negative integer"),
        (dict(innovation_loss_weight=-0.1), r"innovation_loss_weight must be >= 0"),
        (dict(ssm_dt_min=0.5, ssm_dt_max=0.1), r"ssm_dt_min/ssm_dt_max"),
        # NaN passes no comparison and inf passes "> 0": both are refused by name
        (dict(rope_theta=float("nan")), r"^rope_theta must be a finite number, got nan$"),
        (dict(rms_norm_eps=float("inf")), r"^rms_norm_eps must be a finite number, got inf$"),
        (dict(innovation_loss_weight=float("nan")), r"^innovation_loss_weight must be a finite number, got nan$"),
        (dict(ssm_dt_max=float("inf")), r"^ssm_dt_max must be a finite number, got inf$"),
        (dict(ssm_dt_init_floor=float("nan")), r"^ssm_dt_init_floor must be a finite number, got nan$"),
        (dict(initializer_range=float("nan")), r"^initializer_range must be a finite number, got nan$"),
        (dict(initializer_range=-0.02), r"^initializer_range must be >= 0, got -0.02$"),
        (dict(rope_theta="10000"), r"^rope_theta must be a finite number, got '10000'$"),
        (dict(memory_per_kv_head=True, key_set_bias=True), r"^memory_per_kv_head and key_set_bias cannot both be true"),
    ],
)
def test_invalid_values_name_field_and_rule(overrides, message):
    with pytest.raises(ValueError, match=message):
        preset_config("tiny", **overrides)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        preset_config("huge")


@pytest.mark.parametrize("name,nominal", [("130m", 130e6), ("370m", 370e6), ("790m", 790e6), ("1.4b", 1.4e9)])
def test_ladder_presets_have_their_nominal_size(name, nominal):
    import torch

    with torch.device("meta"):  # count parameters without allocating them
        model = BMojoForCausalLM(preset_config(name))
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - nominal) / nominal < 0.15, count


def test_cpu_preset_is_a_few_million_parameters():
    count = sum(p.numel() for p in BMojoForCausalLM(preset_config("cpu")).parameters())
    assert 2e6 < count < 10e6


def test_every_preset_is_valid_and_round_trips(tmp_path):
    for name in PRESETS:
        cfg = preset_config(name)
        cfg.save_pretrained(tmp_path / name)
        loaded = AutoConfig.from_pretrained(tmp_path / name)
        assert isinstance(loaded, BMojoConfig)
        drop = lambda d: {k: v for k, v in d.items() if k != "_name_or_path"}  # noqa: E731
        assert drop(loaded.to_dict()) == drop(cfg.to_dict())


def test_auto_classes_know_bmojo():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(preset_config("tiny"))
    assert isinstance(model, bmojo.BMojoForCausalLM)
    assert AutoConfig.for_model("bmojo").model_type == "bmojo"


def test_loading_a_checkpoint_never_runs_its_code(tmp_path):
    """transformers 4.57 imports a local custom_generate/generate.py in from_pretrained even with
    trust_remote_code=False (the XLA tier runs this file on that line); bmojo refuses such a directory."""
    from bmojo.checkpoint import load_model
    from bmojo.errors import BMojoError

    BMojoForCausalLM(preset_config("tiny")).save_pretrained(tmp_path / "ckpt")
    assert isinstance(load_model(tmp_path / "ckpt"), BMojoForCausalLM)
    marker = tmp_path / "marker"
    (tmp_path / "ckpt" / "custom_generate").mkdir()
    (tmp_path / "ckpt" / "custom_generate" / "generate.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n\n\ndef generate(model, **kwargs):\n"
        "    return None\n"
    )
    with pytest.raises(BMojoError, match="holds custom_generate/, Python code that bmojo never runs"):
        load_model(tmp_path / "ckpt")
    assert not marker.exists()
