"""Configuration of B'MOJO models.

One config describes every member of the family through a per-layer type list (the same table is in README.md,
"The model", with the test that checks each equality):

| ``layers_block_type``               | other settings                          | the model is                  |
|-------------------------------------|-----------------------------------------|-------------------------------|
| all ``"attention"``                 | ``window_size >= sequence length``      | a causal Transformer          |
| all ``"attention"``                 | finite ``window_size``                  | a sliding-window Transformer  |
| all ``"ssm"``                       | ``use_mlp=False``                       | Mamba-2                       |
| ``"ssm"`` and ``"attention"`` mixed |                                         | a Jamba-style hybrid          |
| all ``"bmojo"``                     | ``memory_size=0`` (c)                   | B'MOJO-F (fading memory only) |
| all ``"bmojo"``                     | ``use_fading=False, memory_size=0`` (c) | sliding-window attention      |
| all ``"bmojo"``                     | ``memory_size>0``                       | B'MOJO                        |
| all ``"bmojo"``                     | ``key_set_bias``, init ``-30`` (a)      | sliding-window attention      |
| all ``"bmojo"``                     | ``fading_self_key``, weights (b)        | Mamba-2 (one SSM per layer)   |

(a) ``key_set_bias_init = layers.bmojo.SWA_EQUIVALENT_KEY_SET_BIAS``: equal to float32 rounding, whatever the
other settings. (b) ``key_set_bias``, ``Hkv * head_dim = hidden_size``, ``q_proj = 0``, ``v_proj = o_proj =
I``, ``self_fading_bias = +1e4``: each layer outputs its SSM's output (exactly, in float64). (c) and
``fading_self_key=False`` (on by default: query ``i`` also attends its own fading token ``f_i``).
"""

from __future__ import annotations

import math

from transformers import PretrainedConfig

from .presets import PRESETS

LAYER_TYPES = ("bmojo", "attention", "ssm")
SELECTION_SCORES = ("key_prediction", "next_input", "random", "recency")
MEMORY_ADMISSIONS = ("chunk", "window_exit")
EIDETIC_KEY_DISTANCES = ("window", "zero")

# B'MOJO's original design ("v0", before issue 11) in the issue-11 fields: ``BMojoConfig(**V0_OPTIONS)`` is the model
# every study before the new defaults trained (the ablation's ``bmojo_v0``). The defaults differ from it in
# eidetic_key_distance, fading_self_key, key_set_bias, learned_selection and memory_admission.
V0_OPTIONS = dict(
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


class BMojoConfig(PretrainedConfig):
    r"""
    Args:
        vocab_size (`int`): size of the token vocabulary.
        hidden_size (`int`): width `d` of the residual stream.
        num_hidden_layers (`int`): number of blocks.
        layers_block_type (`list[str]`, *optional*): one of ``"bmojo"``, ``"attention"``, ``"ssm"`` per layer;
            defaults to ``"bmojo"`` everywhere.
        num_attention_heads (`int`): query heads.
        num_key_value_heads (`int`, *optional*): key/value heads (GQA); defaults to ``num_attention_heads``.
        head_dim (`int`, *optional*): defaults to ``hidden_size // num_attention_heads``.
        attention_bias (`bool`): biases on the query, key and value projections (as Qwen2 has; ``bmojo convert``
            sets it from the source). The output projection never has one.
        window_size (`int`): in-context window ``W``: query ``i`` sees tokens ``[i-W+1, i]``; a multiple of
            ``chunk_size``. With ``W >= L`` an ``attention`` layer is full causal attention.
        chunk_size (`int`): chunk ``C`` of the chunked SSD scan, of the chunked attention and of eidetic
            selection. The 130m-1.4b presets use 128, the Trainium partition width.
        ssd_chunk_size (`int`, *optional*): chunk of the chunked SSD scan alone, when it should differ from
            ``chunk_size`` (the SSD's in-chunk cost grows with its chunk; the attention's window must be a multiple
            of ``chunk_size``). Defaults to ``chunk_size``; the result does not depend on it, only the speed.
        sequence_block_size (`int`, *optional*): the attention and SSD ops of a layer run over blocks of this many
            tokens (rounded down to whole chunks of each op) when the sequence is longer: an attention block computes
            its queries from only the key windows, masks and scores they need; an SSD block starts from the state
            the previous block ended with. Each op's temporaries then stay bounded, and with selective recompute
            each block is recomputed on its own. Eager execution only (an XLA graph keeps the ops whole); not for an
            attention window covering the sequence. ``None``: the whole sequence in one call. The result does not
            depend on it (up to the order of sums in the gradient and the scan), only the speed and the memory.
        use_fading (`bool`): ``bmojo`` layers attend the SSM's fading tokens of the span ``[i-2W+1, i-W]``.
        memory_size (`int`): eidetic memory slots ``M`` per ``bmojo`` layer; 0 turns eidetic memory off.
        selections_per_chunk (`int`): tokens selected by the innovation test in each chunk (``k_sel``).
        innovation_loss_weight (`float`): weight of the innovation predictor's auxiliary loss.

        Eidetic-memory design options (issue 11). The defaults are the design chosen there; "v0" names each
        field's original value (``V0_OPTIONS`` holds them all: the model before issue 11):

        selection_score (`str`): what ranks tokens for the memory. ``"key_prediction"`` (default, v0): squared
            error of predicting token ``t``'s key from the fading token ``f_{t-1}``; ``"next_input"``: the paper's
            innovation test, the error of predicting the layer input ``h_t`` from ``f_{t-1}``; ``"random"``: a
            hash of (layer, position, token id) in ``[0, 1)``, the random-choice baseline (a different draw in
            every example, the same in decoding as in the parallel forward); ``"recency"``: the position (newest
            wins), a baseline.
        learned_selection (`bool`): default ``True`` (v0: ``False``). A learned per-token bias ``u_t`` (linear in
            ``h_t``, zero at initialisation): selection ranks ``score * exp(u_t)`` and a selected token's eidetic
            logit gets ``+ u_t``, so the LM loss teaches which tokens are worth keeping.
        memory_score_decay (`float`): retention; each memory slot's score is multiplied by this factor at every
            chunk boundary (``1.0``, default and v0: keep the highest scores ever seen; ``0 < decay < 1``: older
            tokens must have scored higher to stay).
        memory_admission (`str`): default ``"window_exit"``: picks join the memory only when their chunk has left
            the window, so no slot holds a token the query cannot see. v0: ``"chunk"``: a chunk's picks join the
            memory when the chunk ends and become visible once they leave the window.
        memory_reset_at_document (`bool`): default and v0 ``False``. ``True``: a query sees no memory slot from an
            earlier document (documents end with ``eos_token_id``), and slots of finished documents are dropped.
        memory_per_kv_head (`bool`): default and v0 ``False``. ``True``: each key/value head selects and keeps its
            own ``memory_size`` tokens (not with ``key_set_bias``, refused: set ``key_set_bias=False`` with it).
        eidetic_key_distance (`str`): relative position at which eidetic keys are scored: default ``"zero"``
            (query and key unrotated: pure content match); v0 ``"window"`` (``2W``, so distances never exceed
            training's).
        fading_self_key (`bool`): default ``True`` (v0: ``False``). Query ``i`` also attends its own fading token
            ``f_i`` (distance 0), so one ``bmojo`` layer can compute exactly what a Mamba-2 layer computes.
        key_set_bias (`bool`): default ``True`` (v0: ``False``). A learned per-head bias added to the logits of
            the fading keys (and the self fading key) and of the eidetic keys; ``key_set_bias_init`` (`float`,
            default and v0 ``0.0``: the biases start neutral) is its initial value (very negative: the layer
            starts as sliding-window attention, as ``bmojo convert`` needs; at
            ``layers.bmojo.SWA_EQUIVALENT_KEY_SET_BIAS = -30`` it equals it to float32 rounding).
        ssm_state_size (`int`): SSD state size ``N``.
        ssm_expand (`int`): SSM inner width is ``ssm_expand * hidden_size``.
        ssm_head_dim (`int`): SSD head size ``P``.
        ssm_ngroups (`int`): groups sharing ``B``/``C`` (and gated-norm groups).
        ssm_conv_kernel (`int`): width of the causal depthwise convolution.
        ssm_dt_min, ssm_dt_max, ssm_dt_init_floor (`float`): range of the initial step sizes.
        use_mlp (`bool`): add a SwiGLU MLP after the mixer in every block.
        intermediate_size (`int`, *optional*): MLP width; defaults to ``ceil(8/3 * hidden_size)`` rounded up to 64.
        rms_norm_eps (`float`), rope_theta (`float`), initializer_range (`float`): as in Llama.
        tie_word_embeddings (`bool`): share the input embedding and the LM head.
        pad_token_id, bos_token_id, eos_token_id (`int`, *optional*): 0, 1 and 2, the byte tokenizer's specials.
        use_cache (`bool`): the default of transformers' ``generate`` (decode with the cache); ``forward``
            returns a cache only when called with ``use_cache=True``.

    Defaults (in ``__init__``) describe the small ``cpu`` preset's shape; ``PRESETS`` below holds the named sizes.
    """

    model_type = "bmojo"
    keys_to_ignore_at_inference = ["cache", "cache_params"]

    # Long on purpose: one keyword argument per hyperparameter (transformers' config convention).
    def __init__(
        self,
        vocab_size: int = 264,
        hidden_size: int = 256,
        num_hidden_layers: int = 4,
        layers_block_type: list[str] | None = None,
        num_attention_heads: int = 4,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        attention_bias: bool = False,
        window_size: int = 128,
        chunk_size: int = 32,
        ssd_chunk_size: int | None = None,
        sequence_block_size: int | None = 512,
        use_fading: bool = True,
        memory_size: int = 32,
        selections_per_chunk: int = 2,
        innovation_loss_weight: float = 0.01,
        selection_score: str = "key_prediction",
        learned_selection: bool = True,
        memory_score_decay: float = 1.0,
        memory_admission: str = "window_exit",
        memory_reset_at_document: bool = False,
        memory_per_kv_head: bool = False,
        eidetic_key_distance: str = "zero",
        fading_self_key: bool = True,
        key_set_bias: bool = True,
        key_set_bias_init: float = 0.0,
        ssm_state_size: int = 32,
        ssm_expand: int = 2,
        ssm_head_dim: int = 32,
        ssm_ngroups: int = 1,
        ssm_conv_kernel: int = 4,
        ssm_dt_min: float = 0.001,
        ssm_dt_max: float = 0.1,
        ssm_dt_init_floor: float = 1e-4,
        use_mlp: bool = True,
        intermediate_size: int | None = None,
        rms_norm_eps: float = 1e-5,
        rope_theta: float = 10000.0,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = True,
        pad_token_id: int | None = 0,
        bos_token_id: int | None = 1,
        eos_token_id: int | None = 2,
        use_cache: bool = True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.layers_block_type = (
            list(layers_block_type) if layers_block_type is not None else ["bmojo"] * num_hidden_layers
        )
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads if num_key_value_heads is not None else num_attention_heads
        self.head_dim = head_dim
        if self.head_dim is None and num_attention_heads > 0 and hidden_size % num_attention_heads == 0:
            self.head_dim = hidden_size // num_attention_heads
        self.attention_bias = attention_bias
        self.window_size = window_size
        self.chunk_size = chunk_size
        self.ssd_chunk_size = ssd_chunk_size
        self.sequence_block_size = sequence_block_size
        self.use_fading = use_fading
        self.memory_size = memory_size
        self.selections_per_chunk = selections_per_chunk
        self.innovation_loss_weight = innovation_loss_weight
        self.selection_score = selection_score
        self.learned_selection = learned_selection
        self.memory_score_decay = memory_score_decay
        self.memory_admission = memory_admission
        self.memory_reset_at_document = memory_reset_at_document
        self.memory_per_kv_head = memory_per_kv_head
        self.eidetic_key_distance = eidetic_key_distance
        self.fading_self_key = fading_self_key
        self.key_set_bias = key_set_bias
        self.key_set_bias_init = key_set_bias_init
        self.ssm_state_size = ssm_state_size
        self.ssm_expand = ssm_expand
        self.ssm_head_dim = ssm_head_dim
        self.ssm_ngroups = ssm_ngroups
        self.ssm_conv_kernel = ssm_conv_kernel
        self.ssm_dt_min = ssm_dt_min
        self.ssm_dt_max = ssm_dt_max
        self.ssm_dt_init_floor = ssm_dt_init_floor
        self.use_mlp = use_mlp
        self.intermediate_size = (
            intermediate_size if intermediate_size is not None else 64 * math.ceil(8 * hidden_size / 3 / 64)
        )
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self._validate_fields()
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    # Derived sizes -----------------------------------------------------------------------------------------------
    @property
    def ssm_inner_size(self) -> int:
        return self.ssm_expand * self.hidden_size

    @property
    def ssm_num_heads(self) -> int:
        return self.ssm_inner_size // self.ssm_head_dim

    @property
    def eidetic(self) -> bool:
        """Whether ``bmojo`` layers keep an eidetic memory."""
        return self.memory_size > 0

    def layer_has_ssm(self, layer_type: str) -> bool:
        # A bmojo layer needs its SSM for the fading tokens (also the self fading key) and for the innovation test.
        return layer_type == "ssm" or (
            layer_type == "bmojo" and (self.use_fading or self.eidetic or self.fading_self_key)
        )

    # Validation --------------------------------------------------------------------------------------------------
    # Long on purpose: one check per field, each error naming the field and its rule.
    def _validate_fields(self) -> None:
        """Raise ``ValueError`` naming the field and the rule it breaks."""

        def positive(name):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "window_size",
            "chunk_size",
            "ssm_state_size",
            "ssm_expand",
            "ssm_head_dim",
            "ssm_ngroups",
            "ssm_conv_kernel",
            "intermediate_size",
        ):
            positive(name)
        for name in ("ssd_chunk_size", "sequence_block_size"):
            if getattr(self, name) is not None:
                positive(name)
        for name in ("memory_size", "selections_per_chunk"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if len(self.layers_block_type) != self.num_hidden_layers:
            raise ValueError(
                f"layers_block_type has {len(self.layers_block_type)} entries "
                f"but num_hidden_layers is {self.num_hidden_layers}"
            )
        for i, layer_type in enumerate(self.layers_block_type):
            if layer_type not in LAYER_TYPES:
                raise ValueError(
                    f"layers_block_type[{i}] is {layer_type!r}: unknown layer type, expected one of {LAYER_TYPES}"
                )
        if self.head_dim is None:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must divide hidden_size ({self.hidden_size}) "
                "when head_dim is not given"
            )
        positive("head_dim")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads ({self.num_key_value_heads}) must divide "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.window_size % self.chunk_size:
            raise ValueError(f"window_size ({self.window_size}) must be a multiple of chunk_size ({self.chunk_size})")
        if self.eidetic and self.selections_per_chunk < 1:
            raise ValueError("selections_per_chunk must be >= 1 when memory_size > 0 (eidetic memory on)")
        if self.selections_per_chunk > self.chunk_size:
            raise ValueError(
                f"selections_per_chunk ({self.selections_per_chunk}) must not exceed chunk_size ({self.chunk_size})"
            )
        if self.ssm_inner_size % self.ssm_head_dim:
            raise ValueError(
                f"ssm_head_dim ({self.ssm_head_dim}) must divide ssm_expand * hidden_size ({self.ssm_inner_size})"
            )
        if self.ssm_num_heads % self.ssm_ngroups:
            raise ValueError(
                f"ssm_ngroups ({self.ssm_ngroups}) must divide the number of SSM heads ({self.ssm_num_heads})"
            )
        for name in (
            "innovation_loss_weight",
            "ssm_dt_min",
            "ssm_dt_max",
            "ssm_dt_init_floor",
            "rms_norm_eps",
            "rope_theta",
            "initializer_range",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not 0 < self.ssm_dt_min <= self.ssm_dt_max:
            raise ValueError(
                f"ssm_dt_min/ssm_dt_max must satisfy 0 < min <= max, got {self.ssm_dt_min}, {self.ssm_dt_max}"
            )
        for name, choices in (
            ("selection_score", SELECTION_SCORES),
            ("memory_admission", MEMORY_ADMISSIONS),
            ("eidetic_key_distance", EIDETIC_KEY_DISTANCES),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        for name in (
            "attention_bias",
            "learned_selection",
            "memory_reset_at_document",
            "memory_per_kv_head",
            "fading_self_key",
            "key_set_bias",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.memory_per_kv_head and self.key_set_bias:
            # The per-head memories fold the key/value heads into the batch; the [H] key-set biases do not fit it.
            raise ValueError("memory_per_kv_head and key_set_bias cannot both be true (per-head memories fold the "
                             "key/value heads into the batch, where the per-query-head key-set biases do not apply)")
        for name in ("memory_score_decay", "key_set_bias_init"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not 0 < self.memory_score_decay <= 1:
            raise ValueError(f"memory_score_decay must be in (0, 1], got {self.memory_score_decay}")
        if self.innovation_loss_weight < 0:
            raise ValueError(f"innovation_loss_weight must be >= 0, got {self.innovation_loss_weight}")
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta}")
        if self.rms_norm_eps <= 0:
            raise ValueError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        for name in ("ssm_dt_init_floor", "initializer_range"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


def preset_config(name: str, **overrides) -> BMojoConfig:
    """Build a named preset (see ``PRESETS``) with keyword overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    kwargs = dict(PRESETS[name])
    kwargs.update(overrides)
    if "layers_block_type" not in kwargs or kwargs["layers_block_type"] is None:
        kwargs["layers_block_type"] = ["bmojo"] * kwargs.get("num_hidden_layers", 4)
    return BMojoConfig(**kwargs)
