"""The five models every comparison trains: B'MOJO and its special cases, at equal parameter count.

    transformer  full causal attention (the window covers the longest input)
    swa          sliding-window attention only
    mamba2       SSM (Mamba-2) layers only
    bmojo_f      B'MOJO without eidetic memory: window + fading memory
    bmojo        B'MOJO: window + fading memory + eidetic memory

``bmojo`` and ``bmojo_f`` follow ``BMojoConfig``'s defaults in everything these fields do not set (since issue 11:
the self fading key, key-set biases, eidetic keys at distance 0, learned selection, window-exit admission), so the
comparisons measure the product as it ships; ``bmojo_f`` is that model without its eidetic memory (so it keeps the
self fading key: the paper's B'MOJO-F, without it, is ``bmojo.evals.ablation``'s ``bmojo_f``).
The smaller variants have their MLP widened until their parameter count reaches B'MOJO's (within 10%).
"""

from __future__ import annotations

import torch

from ..configuration_bmojo import BMojoConfig
from ..modeling_bmojo import BMojoForCausalLM

VARIANTS = ("transformer", "swa", "mamba2", "bmojo_f", "bmojo")
LABELS = {"transformer": "Transformer", "swa": "SWA", "mamba2": "Mamba-2", "bmojo_f": "B'MOJO-F", "bmojo": "B'MOJO"}


def base_fields(settings, vocab_size: int) -> dict:
    """The BMojoConfig fields shared by every variant, from a study's settings (``hidden_size``, ``num_layers``,
    ``num_heads``, ``window``, ``chunk``, ``memory_size``, ``selections_per_chunk``, ``ssm_state_size``,
    ``ssm_head_dim``)."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=settings.hidden_size,
        num_hidden_layers=settings.num_layers,
        num_attention_heads=settings.num_heads,
        window_size=settings.window,
        chunk_size=settings.chunk,
        memory_size=settings.memory_size,
        selections_per_chunk=settings.selections_per_chunk,
        ssm_state_size=settings.ssm_state_size,
        ssm_head_dim=settings.ssm_head_dim,
    )


def variant_config(name: str, base: dict, full_window: int, intermediate_size: int | None = None) -> BMojoConfig:
    """``base``: BMojoConfig fields shared by all variants (``window_size`` is the SWA/B'MOJO window, ``memory_size``
    B'MOJO's eidetic memory); ``full_window``: the Transformer's window, at least the longest input."""
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
    layers = {"transformer": "attention", "swa": "attention", "mamba2": "ssm"}.get(name, "bmojo")
    fields = dict(base, layers_block_type=[layers] * base["num_hidden_layers"], intermediate_size=intermediate_size)
    fields.update(
        window_size=full_window if name == "transformer" else base["window_size"],
        use_fading=name in ("bmojo_f", "bmojo"),
        memory_size=base.get("memory_size", 0) if name == "bmojo" else 0,
    )
    return BMojoConfig(**fields)


def parameter_count(config: BMojoConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in BMojoForCausalLM(config).parameters())


def matched_configs(names, base: dict, full_window: int) -> dict[str, BMojoConfig]:
    """Each variant's config, its MLP widened until its parameter count reaches B'MOJO's (to within 10%)."""
    target = parameter_count(variant_config("bmojo", base, full_window))
    configs = {}
    for name in names:
        cfg = variant_config(name, base, full_window)
        width = cfg.intermediate_size
        while parameter_count(cfg) < 0.98 * target:
            width += 8
            cfg = variant_config(name, base, full_window, width)
        if abs(parameter_count(cfg) - target) > 0.1 * target:
            raise ValueError(f"cannot match {name}'s parameters to B'MOJO's {target}: {parameter_count(cfg)}")
        configs[name] = cfg
    return configs
