"""`bmojo convert`: small random transformers Llama, Mistral and Qwen2 models, saved to disk, converted through the
command line, compute the same logits (float32, <= 1e-4) and greedy tokens as the source; what cannot convert is
refused in one line."""

import json

import pytest
import torch
from support import cli, one_error_line
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from bmojo import BMojoForCausalLM
from bmojo.convert import GATE_INIT, parse_layers
from bmojo.errors import BMojoError
from bmojo.tokenization import load_tokenizer, train_bpe

# core: conversion is a user path on the trn1 stack too (transformers 4.57 writes rope_theta / rope_scaling).
pytestmark = pytest.mark.core

SIZES = dict(vocab_size=80, hidden_size=32, intermediate_size=48, num_hidden_layers=2, max_position_embeddings=24)
KINDS = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
         "qwen2": (Qwen2Config, Qwen2ForCausalLM)}  # fmt: skip


def source_model(kind: str, seed: int = 0, **overrides):
    """A random source model; every parameter (norm weights and Qwen2's biases included) moved off its
    initialisation, so a weight landing in the wrong place, or a norm read as ``1 + w``, shows."""
    config_class, model_class = KINDS[kind]
    fields = {**SIZES, "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False}
    torch.manual_seed(seed)
    model = model_class(config_class(**{**fields, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def convert(tmp_path, model, *flags, name="src"):
    src, dst = tmp_path / name, tmp_path / f"{name}-bmojo"
    model.save_pretrained(src)
    assert cli(["convert", "--from", str(src), "--out", str(dst), "--chunk-size", "8", *flags]) == 0
    return BMojoForCausalLM.from_pretrained(dst).eval(), dst


def max_logit_error(source, converted, length: int, seed: int = 1) -> float:
    ids = torch.randint(0, SIZES["vocab_size"], (2, length), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return (source(ids).logits - converted(ids).logits).abs().max().item()


CASES = {
    "llama-gqa-untied": ("llama", {}),
    "llama-mha-tied": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "mistral-no-window": ("mistral", dict(sliding_window=None)),
    "mistral-window": ("mistral", dict(sliding_window=16)),
    "qwen2-gqa-untied": ("qwen2", {}),
    "qwen2-mha-tied": ("qwen2", dict(num_key_value_heads=4, tie_word_embeddings=True)),
}


@pytest.mark.parametrize("case", CASES)
def test_converted_model_computes_the_source_logits(tmp_path, case):
    kind, overrides = CASES[case]
    source = source_model(kind, **overrides)
    converted, _ = convert(tmp_path, source)
    cfg = converted.config
    assert cfg.layers_block_type == ["bmojo", "bmojo"] and cfg.key_set_bias and cfg.key_set_bias_init == GATE_INIT
    assert cfg.attention_bias == (kind == "qwen2") and cfg.tie_word_embeddings == source.config.tie_word_embeddings
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (4, source.config.num_key_value_heads)
    if case == "mistral-window":
        # the source's window, at every length: transformers' sliding window is B'MOJO's [i-W+1, i]
        assert cfg.window_size == 16
        assert max_logit_error(source, converted, 40) <= 1e-4
    else:
        assert cfg.window_size == 24  # max_position_embeddings, a multiple of the chunk size already
        assert max_logit_error(source, converted, 24) <= 1e-4


def test_window_rounds_up_and_limits_the_context(tmp_path):
    assert GATE_INIT == -30.0  # what `bmojo convert --help` states
    source = source_model("llama", max_position_embeddings=20)
    converted, _ = convert(tmp_path, source)
    assert converted.config.window_size == 24  # 20 rounded up to a multiple of 8
    narrow, _ = convert(tmp_path, source, "--window", "8", name="narrow")
    assert max_logit_error(source, narrow, 8) <= 1e-4
    assert max_logit_error(source, narrow, 20) > 1e-2  # beyond the window it is a window-limited model


def test_the_self_fading_key_is_silenced_too(tmp_path):
    """With ``fading_self_key`` every query sees its own fading token, inside the window too: only its key-set
    bias keeps the converted model equal to the source there."""
    source = source_model("llama")
    converted, _ = convert(tmp_path, source, "--set", "fading_self_key=true")
    assert converted.config.fading_self_key and converted.model.layers[0].mixer.self_fading_bias.eq(-30).all()
    assert max_logit_error(source, converted, 24) <= 1e-4
    with torch.no_grad():
        for layer in converted.model.layers:
            layer.mixer.self_fading_bias.fill_(0.0)
    assert max_logit_error(source, converted, 24) > 1e-3  # the check can fail: open, the self key changes logits


def test_layer_pattern_is_respected(tmp_path):
    source = source_model("llama", num_hidden_layers=4)
    converted, _ = convert(tmp_path, source, "--layers", "attention,bmojo")
    assert converted.config.layers_block_type == ["attention", "bmojo", "attention", "bmojo"]
    names = {n for n, _ in converted.named_parameters()}
    assert not any(n.startswith(("model.layers.0.mixer.ssm", "model.layers.2.mixer.ssm")) for n in names)
    assert "model.layers.1.mixer.ssm.A_log" in names and "model.layers.1.mixer.fading_bias" in names
    assert max_logit_error(source, converted, 24) <= 1e-4
    assert parse_layers("bmojo=0,2-3", 5) == ["bmojo", "attention", "bmojo", "bmojo", "attention"]
    assert parse_layers("attention=4", 5) == ["bmojo"] * 4 + ["attention"]
    assert parse_layers(None, 2) == ["bmojo", "bmojo"]


@pytest.mark.parametrize(
    "pattern, message",
    [
        ("ssm", "--layers 'ssm': 'ssm' is not a layer type to convert to"),
        ("bmojo=0,9", "--layers 'bmojo=0,9': '9' is outside layers 0-1"),
        ("bmojo=x", "--layers 'bmojo=x': 'x' is not a layer index or a range a-b"),
    ],
)
def test_bad_layer_patterns_are_one_line(pattern, message):
    with pytest.raises(BMojoError, match=message.replace("(", r"\(")):
        parse_layers(pattern, 2)


def test_greedy_generation_equals_the_source(tmp_path):
    source = source_model("llama", tie_word_embeddings=True)
    converted, _ = convert(tmp_path, source)
    prompt = torch.tensor([[5, 17, 33, 2, 41, 8]])
    options = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    expected = source.generate(prompt, **options)
    assert torch.equal(converted.generate(prompt, **options), expected)


def test_the_tokenizer_and_generation_config_are_copied(tmp_path):
    source = source_model("qwen2")
    src = tmp_path / "src"
    source.save_pretrained(src)
    tokenizer = train_bpe([b"def f(x):\n    return x + 1\n" * 20], 300)
    tokenizer.save(src)
    dst = tmp_path / "dst"
    assert cli(["convert", "--from", str(src), "--out", str(dst), "--chunk-size", "8"]) == 0
    assert load_tokenizer(dst).fingerprint() == tokenizer.fingerprint()
    assert json.loads((dst / "generation_config.json").read_text()) == json.loads(
        (src / "generation_config.json").read_text()
    )
    assert not list(dst.glob("*.index.json")) and (dst / "model.safetensors").is_file()


def _saved(tmp_path, model):
    model.save_pretrained(tmp_path / "src")
    return str(tmp_path / "src")


def test_refusals_are_one_line(tmp_path, capsys):
    def refused(src, *flags):
        assert cli(["convert", "--from", src, "--out", str(tmp_path / "out"), "--chunk-size", "8", *flags]) == 2
        assert not (tmp_path / "out").exists()
        return one_error_line(capsys)

    torch.manual_seed(0)
    gpt2_config = GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, bos_token_id=1, eos_token_id=2)
    gpt2 = _saved(tmp_path / "gpt2", GPT2LMHeadModel(gpt2_config))
    assert refused(gpt2) == (
        f"--from {gpt2!r} is GPT2LMHeadModel; bmojo convert supports LlamaForCausalLM, MistralForCausalLM (with or "
        "without sliding_window) and Qwen2ForCausalLM"
    )
    scaled = _saved(tmp_path / "scaled", source_model("llama", rope_parameters=dict(rope_type="linear", factor=2.0)))
    line = refused(scaled)  # transformers 5 adds rope_theta to the dict, 4.57 does not
    assert line.startswith("the source uses rotary scaling (rope_type 'linear': {'factor': 2.0, ")
    assert line.endswith("'rope_type': 'linear'}); bmojo convert supports only plain rotary embeddings (rope_type "
                         "'default')")  # fmt: skip
    window = _saved(tmp_path / "window", source_model("mistral", sliding_window=12))
    assert refused(window) == (
        "the source's sliding_window (12) is not a multiple of --chunk-size (8): choose a chunk size that divides it"
    )
    window16 = _saved(tmp_path / "window16", source_model("mistral", sliding_window=16))
    assert refused(window16, "--window", "24") == (
        "--window 24 is wider than the source's sliding_window (16): the converted layers would see keys the "
        "source never sees"
    )
    mixed = source_model("qwen2", num_hidden_layers=2, use_sliding_window=True, sliding_window=16, max_window_layers=1)
    assert refused(_saved(tmp_path / "mixed", mixed)).startswith(
        "the source mixes sliding-window and full-attention layers (layer_types ['full_attention', "
        "'sliding_attention']); a B'MOJO model has one window"
    )
    biased = _saved(tmp_path / "biased", source_model("llama", attention_bias=True))
    assert refused(biased).startswith("the source's attention has biases on all four projections")
    assert refused(str(tmp_path / "none")) == f"--from {str(tmp_path / 'none')!r} has no config.json: give a " \
        "transformers model directory"  # fmt: skip
    assert refused(window16, "--window", "12").startswith("invalid B'MOJO configuration: window_size (12) must be")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("")
    assert cli(["convert", "--from", window16, "--out", str(tmp_path / "out")]) == 2
    assert one_error_line(capsys) == f"--out {str(tmp_path / 'out')!r} exists and is not an empty directory"
