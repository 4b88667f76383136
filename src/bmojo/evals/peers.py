"""transformers' own models that equal B'MOJO's special cases: Llama (``attention`` layers with ``W >= L``) and
Mamba-2 (``ssm`` layers without MLP). Used to test the equalities and as peers in benchmarks."""

from __future__ import annotations

from ..configuration_bmojo import BMojoConfig


def llama_config(config: BMojoConfig, max_positions: int = 4096):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta,
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
        max_position_embeddings=max_positions,
    )


def mamba2_config(config: BMojoConfig):
    from transformers import Mamba2Config

    return Mamba2Config(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        state_size=config.ssm_state_size,
        expand=config.ssm_expand,
        head_dim=config.ssm_head_dim,
        num_heads=config.ssm_num_heads,
        n_groups=config.ssm_ngroups,
        conv_kernel=config.ssm_conv_kernel,
        chunk_size=config.chunk_size,
        layer_norm_epsilon=config.rms_norm_eps,
        use_bias=False,
        use_conv_bias=True,
        tie_word_embeddings=True,
        residual_in_fp32=False,
    )


def llama_state_dict(state: dict) -> dict:
    """Our parameter names -> LlamaForCausalLM's."""
    renames = {
        ".input_norm.": ".input_layernorm.",
        ".post_mixer_norm.": ".post_attention_layernorm.",
        ".mixer.": ".self_attn.",
    }
    out = {}
    for name, tensor in state.items():
        for ours, theirs in renames.items():
            name = name.replace(ours, theirs)
        out[name] = tensor
    return out


def mamba2_state_dict(state: dict) -> dict:
    """Our parameter names -> Mamba2ForCausalLM's."""
    out = {}
    for name, tensor in state.items():
        name = name.replace("model.embed_tokens", "backbone.embeddings").replace("model.norm.", "backbone.norm_f.")
        name = name.replace("model.layers.", "backbone.layers.").replace(".input_norm.", ".norm.")
        out[name] = tensor
    return out
