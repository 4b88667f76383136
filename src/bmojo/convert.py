"""``bmojo convert --from SRC --out DST``: a pretrained transformers Llama, Mistral or Qwen2 checkpoint directory as
a B'MOJO that computes the same function, ready to learn its memories (``bmojo train --init DST``).

Why it can be exact. A B'MOJO ``attention`` layer is Llama's attention (rotary GQA, rotate-half convention,
``head_dim ** -0.5`` scale, pre-RMSNorm blocks with a SwiGLU MLP), and a ``bmojo`` layer is that attention plus
three key sets of its own: the fading tokens of the span ``[i-2W+1, i-W]``, the eidetic memory (slots with
``pos <= i-W``) and, with ``fading_self_key``, query ``i``'s own fading token. On an input of at most ``W`` tokens
the first two are empty; the key-set biases (``key_set_bias``, initialised to ``key_set_bias_init``, very negative)
silence all of them, so the converted layer is sliding-window attention of window ``W`` and, for inputs up to
``W`` tokens, the source's attention. The default ``W`` covers the source's ``max_position_embeddings``, so the
converted model is the source wherever the source was trained; a smaller ``--window`` makes it window-limited
(priming then teaches the memories to cover what the window drops).

The weights, by name (``{i}``: the layer)::

    model.embed_tokens.weight                      -> model.embed_tokens.weight
    model.layers.{i}.input_layernorm.weight        -> model.layers.{i}.input_norm.weight
    model.layers.{i}.self_attn.{q,k,v}_proj.weight -> model.layers.{i}.mixer.{q,k,v}_proj.weight  (.bias: Qwen2)
    model.layers.{i}.self_attn.o_proj.weight       -> model.layers.{i}.mixer.o_proj.weight
    model.layers.{i}.post_attention_layernorm.weight -> model.layers.{i}.post_mixer_norm.weight
    model.layers.{i}.mlp.{gate,up,down}_proj.weight -> model.layers.{i}.mlp.{gate,up,down}_proj.weight
    model.norm.weight                              -> model.norm.weight
    lm_head.weight                                 -> lm_head.weight  (not stored when the embeddings are tied)

The layouts agree: ``BMojoRMSNorm`` is Llama's (``x * rsqrt(mean(x^2) + eps)`` in float32, times ``weight``, not
``1 + weight``), ``BMojoMLP`` is ``down(silu(gate(x)) * up(x))``, grouped-query heads read key/value head
``h // (H / Hkv)`` in both. The new parameters (the SSM, the innovation predictor, the key-set biases) get
B'MOJO's own initialisation (seeded). Everything is written in float32 (bf16/fp16 sources convert exactly).

Refused, with one line each: other architectures; rotary scaling of any kind (``rope_scaling`` /
``rope_parameters`` other than ``"default"``); activations other than SiLU; Llama's output-projection and MLP
biases; sources that mix sliding-window and full-attention layers (B'MOJO has one window); a ``--window`` wider
than the source's sliding window (the converted layer would see keys the source never sees); weights only in
pickle files (``pytorch_model.bin``: nothing is unpickled).

Sliding windows. transformers' mask lets query ``i`` see keys ``j`` with ``i - sliding_window < j <= i``
(``masking_utils.sliding_window_overlay``): ``sliding_window`` keys, the query's own included, exactly B'MOJO's
window ``[i-W+1, i]``. So a Mistral (or Qwen2 with ``use_sliding_window``) of window ``S`` converts with ``W = S``
by default (``S`` must be a multiple of ``--chunk-size``), and stays exact at every length.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .configuration_bmojo import BMojoConfig
from .errors import BMojoError
from .layers.bmojo import SWA_EQUIVALENT_KEY_SET_BIAS

# model_type -> the class name the source declares.
SUPPORTED = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
SUPPORTED_LINE = "LlamaForCausalLM, MistralForCausalLM (with or without sliding_window) and Qwen2ForCausalLM"
CONVERTIBLE_TYPES = ("bmojo", "attention")  # an "ssm" layer cannot compute what the source's attention computes
# The initial key-set bias of converted bmojo layers (``key_set_bias_init``): at -30 the fading and eidetic logits
# sit so far below the window's that the layer is sliding-window attention to float32 rounding (the attention
# helper's bound, ``layers.bmojo.SWA_EQUIVALENT_KEY_SET_BIAS``; tests/test_key_sets.py). Their gradient vanishes
# there too, so priming raises them first (``bmojo train --key-set-bias``).
GATE_INIT = SWA_EQUIVALENT_KEY_SET_BIAS
DEFAULT_CHUNK = 128  # the Trainium partition width, as the 130m-1.4b presets
# Files of the source directory that are not copied: the configuration (rewritten) and weights in any format.
_NOT_COPIED = re.compile(r"config\.json|.*\.(safetensors|bin|pt|pth|h5|msgpack|gguf|ckpt)|.*\.safetensors\.index\.json")

_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_LAYER_NAMES = {  # source name inside a layer -> ours
    "input_layernorm.weight": "input_norm.weight",
    "post_attention_layernorm.weight": "post_mixer_norm.weight",
    **{f"self_attn.{p}_proj.{w}": f"mixer.{p}_proj.{w}" for p in "qkvo" for w in ("weight", "bias")},
    **{f"mlp.{p}_proj.weight": f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")},
}
_TOP_NAMES = {"model.embed_tokens.weight": "model.embed_tokens.weight", "model.norm.weight": "model.norm.weight",
              "lm_head.weight": "lm_head.weight"}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# The layer pattern
# ---------------------------------------------------------------------------------------------------------------
def parse_layers(pattern: str | None, num_layers: int) -> list[str]:
    """``--layers``: the type of every layer.

    * ``None``: every layer ``bmojo``;
    * ``"bmojo,attention"``: a list of types repeated over the layers (and cut at the last one), so
      ``"attention,bmojo"`` on 4 layers gives attention, bmojo, attention, bmojo;
    * ``"bmojo=0,2,5-7"`` or ``"attention=0,31"``: the listed layers (indices, ``a-b`` ranges inclusive) get that
      type, the others the other type.
    """
    if pattern is None:
        return ["bmojo"] * num_layers
    text = pattern.replace(" ", "")
    kind, sep, indices = text.partition("=")
    if sep:
        if kind not in CONVERTIBLE_TYPES:
            raise BMojoError(f"--layers {pattern!r}: {kind!r} is not a layer type to convert to; use bmojo/attention")
        chosen = set()
        for part in indices.split(","):
            m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
            if not m:
                raise BMojoError(f"--layers {pattern!r}: {part!r} is not a layer index or a range a-b")
            low, high = int(m.group(1)), int(m.group(2) or m.group(1))
            if low > high or high >= num_layers:
                raise BMojoError(f"--layers {pattern!r}: {part!r} is outside layers 0-{num_layers - 1}")
            chosen.update(range(low, high + 1))
        other = CONVERTIBLE_TYPES[1 - CONVERTIBLE_TYPES.index(kind)]
        return [kind if i in chosen else other for i in range(num_layers)]
    types = text.split(",")
    for t in types:
        if t not in CONVERTIBLE_TYPES:
            raise BMojoError(
                f"--layers {pattern!r}: {t!r} is not a layer type to convert to; use bmojo or attention "
                "(a list repeated over the layers, or TYPE=INDICES)"
            )
    return [types[i % len(types)] for i in range(num_layers)]


# ---------------------------------------------------------------------------------------------------------------
# The source
# ---------------------------------------------------------------------------------------------------------------
def read_source_config(source: Path):
    """The source's transformers config, after refusing what cannot convert by its ``model_type``."""
    file = source / "config.json"
    if not file.is_file():
        raise BMojoError(f"--from {str(source)!r} has no config.json: give a transformers model directory")
    try:
        raw = json.loads(file.read_text())
    except ValueError as exc:
        raise BMojoError(f"{file}: cannot parse: {exc}") from None
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED:
        what = ", ".join(raw.get("architectures") or []) or f"model_type {model_type!r}"
        raise BMojoError(f"--from {str(source)!r} is {what}; bmojo convert supports {SUPPORTED_LINE}")
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(source), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # transformers raises many kinds
        raise BMojoError(f"cannot read {file}: {' '.join(str(exc).split())[:300]}") from exc


def rope_of(cfg) -> tuple[float, dict | None]:
    """``(rope_theta, scaling)`` of a transformers config, 5.x (``rope_parameters``) or 4.x (``rope_theta``,
    ``rope_scaling``); ``scaling`` is ``None`` for plain rotary embeddings."""
    params = getattr(cfg, "rope_parameters", None) or {}
    theta = float(params["rope_theta"]) if "rope_theta" in params else float(cfg.rope_theta)
    # Either field naming a scaling is refused, whichever transformers line wrote or reads the file.
    for scaling in (params, getattr(cfg, "rope_scaling", None) or {}):
        if scaling.get("rope_type", scaling.get("type", "default")) != "default":
            return theta, dict(scaling)
    return theta, None


def sliding_window_of(cfg) -> int | None:
    """The source's sliding window (``None``: full attention everywhere); refuses a mix of the two."""
    window = getattr(cfg, "sliding_window", None)
    layer_types = getattr(cfg, "layer_types", None)
    if cfg.model_type == "qwen2" and not getattr(cfg, "use_sliding_window", False):
        return None
    if layer_types is not None and window is not None:
        kinds = set(layer_types)
        if kinds == {"full_attention"}:
            return None
        if kinds != {"sliding_attention"}:
            raise BMojoError(
                f"the source mixes sliding-window and full-attention layers (layer_types {layer_types}); "
                "a B'MOJO model has one window for all layers"
            )
    return window


def check_source(cfg) -> None:
    """Refuse, in one line, what the B'MOJO layers do not compute."""
    theta, scaling = rope_of(cfg)
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        raise BMojoError(
            f"the source uses rotary scaling (rope_type {kind!r}: {dict(sorted(scaling.items()))}); bmojo convert "
            "supports only plain rotary embeddings (rope_type 'default')"
        )
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise BMojoError(f"the source's hidden_act is {cfg.hidden_act!r}; B'MOJO's MLP is SwiGLU (silu)")
    if getattr(cfg, "partial_rotary_factor", 1.0) != 1.0:
        raise BMojoError(f"the source rotates part of each head (partial_rotary_factor {cfg.partial_rotary_factor})")
    if getattr(cfg, "mlp_bias", False):
        raise BMojoError("the source's MLP has biases (mlp_bias); B'MOJO's MLP has none")
    if cfg.model_type != "qwen2" and getattr(cfg, "attention_bias", False):
        raise BMojoError("the source's attention has biases on all four projections (attention_bias); B'MOJO has "
                         "query/key/value biases only (as Qwen2)")  # fmt: skip


def load_source_weights(source: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the source's safetensors file(s)."""
    index = source / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (source / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise BMojoError(
            f"--from {str(source)!r} holds no model.safetensors (bmojo never unpickles pytorch_model.bin): "
            "save the model with save_pretrained(..., safe_serialization=True)"
        )
    tensors = {}
    try:
        for name in files:
            with safe_open(source / name, framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (not a dict)
                    tensors[key] = f.get_tensor(key)
    except (OSError, SafetensorError) as exc:
        raise BMojoError(f"cannot read the weights in {source}: {exc}") from None
    return tensors


def target_name(name: str) -> str | None:
    """Our parameter name for a source tensor; ``None`` for tensors with no counterpart (rotary caches)."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    m = _LAYER.fullmatch(name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    if m and m.group(2).endswith("rotary_emb.inv_freq"):
        return None
    raise BMojoError(f"the source's weight {name!r} has no counterpart in a B'MOJO model")


# ---------------------------------------------------------------------------------------------------------------
# The conversion
# ---------------------------------------------------------------------------------------------------------------
def default_window(cfg, chunk_size: int, window: int | None) -> int:
    """``--window``, checked against the source's sliding window; by default the source's sliding window, else its
    ``max_position_embeddings`` rounded up to a multiple of ``chunk_size``."""
    sliding = sliding_window_of(cfg)
    if sliding is not None:
        if sliding % chunk_size:
            raise BMojoError(
                f"the source's sliding_window ({sliding}) is not a multiple of --chunk-size ({chunk_size}): "
                "choose a chunk size that divides it"
            )
        if window is not None and window > sliding:
            raise BMojoError(
                f"--window {window} is wider than the source's sliding_window ({sliding}): the converted layers "
                "would see keys the source never sees"
            )
        return sliding if window is None else window
    if window is not None:
        return window
    return chunk_size * math.ceil(cfg.max_position_embeddings / chunk_size)


def bmojo_config(cfg, layers: list[str], window: int, chunk_size: int, overrides: dict) -> BMojoConfig:
    """The B'MOJO configuration of the source ``cfg``: its shapes, norms and rotary base; B'MOJO's defaults for
    the new parts (SSM, memory), then ``overrides``; key-set biases on, silenced."""
    theta, _ = rope_of(cfg)
    eos = cfg.eos_token_id[0] if isinstance(cfg.eos_token_id, (list, tuple)) else cfg.eos_token_id
    fields = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        layers_block_type=layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads or cfg.num_attention_heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
        attention_bias=cfg.model_type == "qwen2",
        window_size=window,
        chunk_size=chunk_size,
        use_mlp=True,
        intermediate_size=cfg.intermediate_size,
        rms_norm_eps=float(cfg.rms_norm_eps),
        rope_theta=theta,
        initializer_range=float(getattr(cfg, "initializer_range", 0.02)),
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        pad_token_id=cfg.pad_token_id,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=eos,
        key_set_bias=True,
        key_set_bias_init=GATE_INIT,
    )
    fields.update(overrides)
    try:
        return BMojoConfig(**fields)
    except (TypeError, ValueError) as exc:
        raise BMojoError(f"invalid B'MOJO configuration: {exc}") from None


def convert(
    source: str | Path,
    out: str | Path,
    layers: str | None = None,
    window: int | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    overrides: dict | None = None,
    seed: int = 0,
) -> BMojoConfig:
    """Write the B'MOJO version of the transformers model in ``source`` to the new directory ``out`` (config.json,
    model.safetensors, and the source's other files but its weights: tokenizer, generation config); returns its
    configuration. ``overrides``: further ``BMojoConfig`` fields (``memory_size``, ``ssm_state_size``, ...).
    ``out`` appears complete or not at all."""
    from .modeling_bmojo import BMojoForCausalLM

    source, out = Path(source), Path(out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise BMojoError(f"--out {str(out)!r} exists and is not an empty directory")
    cfg = read_source_config(source)
    check_source(cfg)
    config = bmojo_config(
        cfg, parse_layers(layers, cfg.num_hidden_layers), default_window(cfg, chunk_size, window), chunk_size,
        dict(overrides or {}),
    )  # fmt: skip
    weights = load_source_weights(source)
    torch.manual_seed(seed)  # the new parameters' initialisation
    model = BMojoForCausalLM(config).float()
    state = model.state_dict()
    filled = set()
    for name, tensor in weights.items():
        ours = target_name(name)
        if ours is None or (ours == "lm_head.weight" and config.tie_word_embeddings):
            continue
        if ours not in state:
            raise BMojoError(f"the source's weight {name!r} has no counterpart in this configuration ({ours})")
        if tuple(state[ours].shape) != tuple(tensor.shape):
            raise BMojoError(
                f"the source's {name} has shape {list(tensor.shape)}, its B'MOJO counterpart {ours} "
                f"{list(state[ours].shape)}"
            )
        state[ours].copy_(tensor.to(torch.float32))
        filled.add(ours)
    expected = {n for n in source_parameter_names(config)}
    missing = sorted(expected - filled)
    if missing:
        raise BMojoError(f"the source has no weight for {missing[0]} ({len(missing)} missing in all)")
    _write(model, source, out)
    return config


def source_parameter_names(config: BMojoConfig) -> list[str]:
    """Our parameters that come from the source (all others are new)."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not config.tie_word_embeddings:
        names.append("lm_head.weight")
    for i in range(config.num_hidden_layers):
        layer = f"model.layers.{i}."
        names += [layer + "input_norm.weight", layer + "post_mixer_norm.weight"]
        names += [layer + f"mixer.{p}_proj.weight" for p in "qkvo"]
        names += [layer + f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
        if config.attention_bias:
            names += [layer + f"mixer.{p}_proj.bias" for p in "qkv"]
    return names


def _write(model, source: Path, out: Path) -> None:
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, max_shard_size="10000GB")  # one model.safetensors, as bmojo's loaders read
        for path in source.iterdir():
            if path.is_file() and not _NOT_COPIED.fullmatch(path.name):
                shutil.copy2(path, tmp / path.name)
        os.replace(tmp, out)  # replaces an empty directory
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise BMojoError(f"cannot write {str(out)!r}: {exc.strerror or exc}") from None
