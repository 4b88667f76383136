"""The named model configurations (``bmojo train --preset NAME``, ``bmojo.preset_config``), plain dicts of
``BMojoConfig`` arguments, importable without torch and transformers."""

# Presets --------------------------------------------------------------------------------------------------------
# Widths follow Mamba's ladder (768/1024/1536/2048); depths are chosen so that the B'MOJO model (mixer + SwiGLU
# MLP per block, tied 50,280-token embedding) lands near the nominal size (tests/test_config.py checks within 15%).
_LADDER_COMMON = dict(
    vocab_size=50280,
    window_size=512,
    chunk_size=128,
    memory_size=128,
    selections_per_chunk=4,
    ssm_state_size=128,
    ssm_head_dim=64,
    ssm_ngroups=8,  # SSM groups split across tensor-parallel ranks (one or more per rank), as in NxD's Mamba-2
)

PRESETS: dict[str, dict] = {
    # For unit tests: every feature on, about 36 thousand parameters, chunks of 4 tokens.
    "tiny": dict(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        window_size=8,
        chunk_size=4,
        memory_size=4,
        selections_per_chunk=2,
        ssm_state_size=8,
        ssm_head_dim=16,
        ssm_conv_kernel=4,
        intermediate_size=64,
    ),
    # The embedded default for CPU training (a few million parameters, byte-level vocabulary).
    "cpu": dict(
        vocab_size=264,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        window_size=128,
        chunk_size=32,
        memory_size=32,
        selections_per_chunk=2,
        ssm_state_size=32,
        ssm_head_dim=32,
    ),
    "130m": dict(_LADDER_COMMON, hidden_size=768, num_hidden_layers=8, num_attention_heads=12, ssm_ngroups=4),
    "370m": dict(_LADDER_COMMON, hidden_size=1024, num_hidden_layers=15, num_attention_heads=16),
    "790m": dict(_LADDER_COMMON, hidden_size=1536, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=8),
    "1.4b": dict(_LADDER_COMMON, hidden_size=2048, num_hidden_layers=17, num_attention_heads=16, num_key_value_heads=8),
}
