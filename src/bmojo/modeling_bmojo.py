"""B'MOJO models: pretrained base -> model -> causal LM, over the cache (``cache.py``) and the layers
(``layers/``: SSM mixer, attention mixer, eidetic memory, B'MOJO layer, block), in the transformers order
cache -> mixers -> block -> model -> causal LM.

One B'MOJO layer (``layer_type="bmojo"``) runs a Mamba-2 SSM over its input to produce one *fading token* per
position, then a single softmax attention over three key sets: the in-context window ``[i-W+1, i]``, the fading
tokens of the span that just left the window ``[i-2W+1, i-W]``, and an eidetic memory of tokens that the
SSM found hard to predict (the innovation test). ``"attention"`` and ``"ssm"`` layers are the two halves alone.
Each part lives in its own module under ``layers/``.

Positions. In-context and fading keys carry rotary embeddings at their true positions; their distances to the
query stay below ``2W``. Eidetic keys are scored as if they sat exactly ``2W`` positions before the query, so
the distances a model sees on long inputs never exceed those it saw in training.

Padding. A left-padded batch is rolled so that every row starts at index 0 and padding trails; each row then
computes exactly what it would alone (chunk boundaries, and with them eidetic selection, align with the row's own
positions). Outputs are rolled back.

Activation (gradient) checkpointing. ``model.gradient_checkpointing_enable()`` (transformers 5.x also
``activation_checkpointing_enable(every_n_layers=...)``) marks the decoder blocks; a training forward (``train()``
mode, gradients enabled) then keeps only each marked block's input and recomputes the block's forward in the
backward (``torch.utils.checkpoint``, always ``use_reentrant=False``). Selection is a pure function of the block's
input, positions and token ids (the ``"random"`` score hashes them), so the recomputation picks the same tokens.
Not checkpointed: ``eval()`` mode, ``torch.no_grad()``, decoding from a cache (it updates the cache in place), and a
prefill that collects the decoding state (``use_cache=True``: run as is, with a warning). On an XLA device the
blocks are checkpointed with ``torch_xla.utils.checkpoint`` instead (``layers.common.recompute``: its optimization
barriers keep XLA's common-subexpression elimination from merging the recomputation back into the forward, which
plain ``torch.utils.checkpoint`` cannot). Refused with one ``ValueError``: a tensor-parallel (sharded) model.

Selective recompute. ``model.selective_recompute_enable()`` recomputes only the attention op and the SSD op in the
backward (their key sets and chunk matrices are most of what a layer keeps; their inputs are little): about half the
saved activations for one more forward of those two ops. It applies to every forward that records a graph in
training mode, also one that collects the decoding state (the ops are pure: nothing in place to replay), on an
XLA device with ``torch_xla.utils.checkpoint`` as checkpointing; refused with tensor parallelism; see
``layers.common.run_op``. Like gradient checkpointing it is a runtime setting of the model object, not saved in its
config (``bmojo train`` keeps it in ``train_config.yaml``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from torch.utils.checkpoint import checkpoint
from transformers.utils import ModelOutput, logging

from .cache import CACHE_ALIASES, CACHE_KWARG, BMojoCache, pop_cache_argument
from .configuration_bmojo import BMojoConfig
from .layers import (
    MIXERS,
    BMojoBlock,
    BMojoGatedRMSNorm,
    BMojoMixer,
    BMojoMLP,
    BMojoRMSNorm,
    Mamba2Mixer,
    Rope,
    SequenceInfo,
    SlidingWindowAttention,
    StepInfo,
)
from .layers.common import RECOMPUTABLE_OPS, recompute
from .layers.eidetic import SelectionBias
from .ops.common import at_least_fp32
from .ops.rope import rope_cos_sin

logger = logging.get_logger(__name__)

# Names that other modules import from here.
BMojoSSM = Mamba2Mixer
BMojoAttention = SlidingWindowAttention  # the old single class of both attention-bearing mixers
__all__ = [
    "CACHE_ALIASES",
    "CACHE_KWARG",
    "MIXERS",
    "BMojoAttention",
    "BMojoBlock",
    "BMojoCache",
    "BMojoCausalLMOutput",
    "BMojoForCausalLM",
    "BMojoGatedRMSNorm",
    "BMojoMLP",
    "BMojoMixer",
    "BMojoModel",
    "BMojoModelOutput",
    "BMojoPreTrainedModel",
    "BMojoRMSNorm",
    "BMojoSSM",
    "Mamba2Mixer",
    "SlidingWindowAttention",
    "pop_cache_argument",
]


# ---------------------------------------------------------------------------------------------------------------
# Pretrained base
# ---------------------------------------------------------------------------------------------------------------
def _init(tensor: torch.Tensor, fn) -> None:
    # Leave tensors loaded from a checkpoint alone (transformers marks them).
    if not getattr(tensor, "_is_hf_initialized", False):
        with torch.no_grad():
            fn(tensor)


class BMojoPreTrainedModel(PreTrainedModel):
    config_class = BMojoConfig
    base_model_prefix = "model"
    _no_split_modules = ["BMojoBlock"]
    supports_gradient_checkpointing = True  # per BMojoBlock (see the module docstring)
    _is_stateful = True  # a recurrent state cannot be rolled back: no assisted decoding

    def _set_gradient_checkpointing(
        self, enable: bool = True, gradient_checkpointing_func=checkpoint, every_n_layers: int = 1
    ) -> None:
        """transformers' hook behind ``gradient_checkpointing_enable()`` / ``_disable()`` (4.57 and 5.x; 5.x also
        passes ``every_n_layers``): marks blocks ``0, n, 2n, ...`` (``BMojoBlock.gradient_checkpointing``) and gives
        them ``gradient_checkpointing_func`` with ``use_reentrant=False`` bound (transformers 4.57 binds ``True`` by
        default; the non-reentrant form is PyTorch's recommended one, and the one tested here). On an XLA device the
        blocks are checkpointed by ``layers.common.recompute`` (``torch_xla.utils.checkpoint``) instead, whatever
        function was given.

        Raises ``ValueError`` when enabling on a tensor-parallel (sharded) model or for ``every_n_layers < 1``."""
        if enable and getattr(self, "tensor_parallel", None) is not None:
            raise ValueError(
                "gradient checkpointing is not supported with tensor parallelism (the model is sharded "
                f"{self.tensor_parallel}; the recomputation would repeat its collectives inside the backward, untested)"
            )
        if not (isinstance(every_n_layers, int) and every_n_layers >= 1):
            raise ValueError(f"every_n_layers must be an integer >= 1, got {every_n_layers!r}")
        if isinstance(gradient_checkpointing_func, functools.partial):
            func = functools.partial(
                gradient_checkpointing_func.func,
                *gradient_checkpointing_func.args,
                **{**gradient_checkpointing_func.keywords, "use_reentrant": False},
            )
        else:
            func = functools.partial(gradient_checkpointing_func, use_reentrant=False)
        blocks = [m for m in self.modules() if isinstance(m, BMojoBlock)]
        for i, block in enumerate(blocks):
            block._gradient_checkpointing_func = func
            block.gradient_checkpointing = bool(enable) and i % every_n_layers == 0

    def selective_recompute_enable(self, ops: str | Iterable[str] = RECOMPUTABLE_OPS) -> None:
        """Recompute the given sequence ops (an op name or several: ``"attention"``, ``"ssd"``; default both) in the
        backward instead of keeping their intermediates (selective activation recomputation,
        ``layers.common.run_op``): every layer then keeps the op's inputs only, the backward runs the op's forward
        once more, and every number stays the same. It applies to training-mode forwards with gradients enabled and
        combines with gradient checkpointing. Where the ops run in blocks (``config.sequence_block_size``), each
        block is recomputed on its own, so the backward holds one block's intermediates at a time. A runtime
        setting, not saved with the model. What it saves and costs: ``docs/results.md`` (the throughput study's
        "selective recompute" rows).

        Raises ``ValueError`` for ops that are not op names, for none, for an op not in ``RECOMPUTABLE_OPS`` (the
        setting is then left as it was) and on a tensor-parallel (sharded) model (untested there). On an XLA device
        the ops are recomputed through ``torch_xla.utils.checkpoint`` (``layers.common.recompute``)."""
        choices = ", ".join(RECOMPUTABLE_OPS)
        if isinstance(ops, str):
            ops = (ops,)
        elif isinstance(ops, Iterable) and not isinstance(ops, (bytes, bytearray)):
            ops = tuple(ops)
        else:
            raise ValueError(f"selective recompute: ops must be op names ({choices}), got {ops!r}")
        if not ops:
            raise ValueError(
                f"selective recompute: no op given; choose from {choices} (selective_recompute_disable() turns it off)"
            )
        unknown = [op for op in ops if op not in RECOMPUTABLE_OPS]
        if unknown:
            raise ValueError(f"selective recompute: unknown op {unknown[0]!r}; choose from {choices}")
        if getattr(self, "tensor_parallel", None) is not None:
            raise ValueError(
                f"selective recompute is not supported with tensor parallelism (the model is sharded "
                f"{self.tensor_parallel}; untested)"
            )
        self._set_recompute_ops(frozenset(ops))

    def selective_recompute_disable(self) -> None:
        """Keep every op's intermediates again (the default)."""
        self._set_recompute_ops(frozenset())

    def _set_recompute_ops(self, ops: frozenset[str]) -> None:
        for module in self.modules():
            if hasattr(module, "recompute_ops"):
                module.recompute_ops = ops

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, SelectionBias):  # learned_selection starts neutral: u = 0
            _init(module.weight, torch.nn.init.zeros_)
            _init(module.bias, torch.nn.init.zeros_)
        elif isinstance(module, nn.Linear):
            _init(module.weight, lambda t: t.normal_(0.0, std))
            if module.bias is not None:
                _init(module.bias, torch.nn.init.zeros_)
        elif isinstance(module, nn.Embedding):
            _init(module.weight, lambda t: t.normal_(0.0, std))
        elif isinstance(module, (BMojoRMSNorm, BMojoGatedRMSNorm)):
            _init(module.weight, torch.nn.init.ones_)
        elif isinstance(module, nn.Conv1d):
            bound = module.kernel_size[0] ** -0.5
            _init(module.weight, lambda t: t.uniform_(-bound, bound))
            _init(module.bias, lambda t: t.uniform_(-bound, bound))
        elif isinstance(module, Mamba2Mixer):
            cfg = self.config
            # S4D-real style decays A = -[1, 16] and log-uniform step sizes in [dt_min, dt_max] (as Mamba-2).
            _init(module.A_log, lambda t: t.copy_(torch.log(torch.empty_like(t).uniform_(1, 16))))
            _init(module.D, torch.nn.init.ones_)

            def dt_bias(t):
                lo, hi = torch.log(torch.tensor(cfg.ssm_dt_min)), torch.log(torch.tensor(cfg.ssm_dt_max))
                dt = torch.exp(torch.rand_like(t) * (hi - lo) + lo).clamp_min(cfg.ssm_dt_init_floor)
                t.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

            _init(module.dt_bias, dt_bias)
        elif isinstance(module, BMojoMixer):
            for name in ("fading_bias", "self_fading_bias", "eidetic_bias"):
                if hasattr(module, name):  # key_set_bias: the configured start (also for a checkpoint without them)
                    _init(getattr(module, name), lambda t: t.fill_(self.config.key_set_bias_init))


# ---------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------
class _CacheAlias:
    """``output.cache_params`` answers ``output.cache`` on every transformers line (5.2x has it built in)."""

    @property
    def cache_params(self) -> BMojoCache | None:
        return self.cache


@dataclass
class BMojoModelOutput(_CacheAlias, ModelOutput):
    """``last_hidden_state [B, L, d]``; ``cache``: the decoding state after the last token (``use_cache=True``);
    ``hidden_states``: the input of every layer and the final normed output (``output_hidden_states=True``)."""

    last_hidden_state: torch.Tensor | None = None
    cache: BMojoCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    innovation_loss: torch.Tensor | None = None


@dataclass
class BMojoCausalLMOutput(_CacheAlias, ModelOutput):
    """``loss = lm_loss + innovation_loss_weight * innovation_loss`` is what training backpropagates;
    ``lm_loss`` and ``innovation_loss`` are reported separately."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    innovation_loss: torch.Tensor | None = None
    cache: BMojoCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


# ---------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------
@torch.compiler.disable
def _check_token_range(input_ids: torch.Tensor, vocab_size: int) -> None:
    """ValueError unless every id lies in [0, vocab_size). Run eagerly under ``torch.compile``: traced, its host
    reads made dynamo guard the rest of the check on the batch's smallest id and recompile it as that changed."""
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"token ids must lie in [0, {vocab_size}) (vocab_size); got values in [{lo}, {hi}]")


class BMojoModel(BMojoPreTrainedModel):
    def __init__(self, config: BMojoConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([BMojoBlock(config, i) for i in range(config.num_hidden_layers)])
        self.norm = BMojoRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def _check_input_ids(self, input_ids: torch.Tensor) -> None:
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.dtype.is_floating_point or input_ids.dtype in (torch.bool, torch.complex64, torch.complex128):
            raise TypeError(f"input_ids must be an integer tensor (torch.long), got dtype {input_ids.dtype}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape [batch, length], got {tuple(input_ids.shape)}")
        if input_ids.numel() == 0:
            raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}): give at least one token per row")
        if input_ids.device.type != "xla":  # a data-dependent check would force a graph sync on XLA
            _check_token_range(input_ids, self.config.vocab_size)

    def _rope(self, positions: torch.Tensor) -> Rope:
        """Angles for ``positions [B or 1, L]`` and the fixed eidetic rotation (``2W``; ``None`` where no layer
        rotates its eidetic queries, ``eidetic_key_distance="zero"``)."""
        cfg = self.config
        dtype = self.embed_tokens.weight.dtype
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, dtype)
        eid_cos = eid_sin = None
        if cfg.eidetic and cfg.eidetic_key_distance == "window" and "bmojo" in cfg.layers_block_type:
            eid_cos, eid_sin = rope_cos_sin(
                torch.full((1, 1), 2 * cfg.window_size, device=positions.device), cfg.head_dim, cfg.rope_theta, dtype
            )
        return Rope(cos, sin, eid_cos, eid_sin)

    # Long on purpose: the parallel forward in order (checks, padding roll, layers, roll back, cache).
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: BMojoCache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BMojoModelOutput | tuple:
        """``input_ids [B, L]`` (left- or right-padded, with ``attention_mask [B, L]``).

        Without ``cache``: a parallel forward; with ``use_cache`` it also returns the decoding state.
        With ``cache`` (also accepted as ``cache_params`` or ``past_key_values``): the tokens are decoded one at a
        time from that state, which is updated in place (``attention_mask`` is then ignored: a cached row has no
        padding ahead of it). ``output_hidden_states`` and ``return_dict`` mean the same on both paths;
        ``output_attentions`` is refused (the joint softmax over three key sets has no per-token attention map).
        """
        cache = pop_cache_argument(cache, kwargs)
        _refuse_unsupported_outputs(kwargs)
        if input_ids is None:
            raise ValueError("input_ids is required (inputs_embeds is not supported)")
        self._check_input_ids(input_ids)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if cache is not None:
            out = self._decode(input_ids, cache, output_hidden_states)
            return out if return_dict else out.to_tuple()
        bsz, length = input_ids.shape
        shift = None
        valid = None
        lengths = None
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
                )
            mask = attention_mask.to(torch.long)
            # On XLA, value checks would force a host sync and a data-dependent branch: a given mask is always
            # applied (rows are rolled even when nothing is padded) and trusted to be left/right padding.
            on_xla = input_ids.device.type == "xla"
            if on_xla or not bool(mask.all()):
                lengths = mask.sum(-1)
                if not on_xla and bool((lengths == 0).any()):
                    raise ValueError("every row of attention_mask needs at least one real token")
                shift = mask.argmax(-1)  # index of the first real token
                input_ids = _roll_rows(input_ids, shift)
                valid = torch.arange(length, device=input_ids.device)[None, :] < lengths[:, None]
                if not on_xla and not bool((_roll_rows(mask, shift).bool() == valid).all()):
                    raise ValueError(
                        "attention_mask must mark one contiguous run of tokens per row (left or right padding)"
                    )
        if use_cache and lengths is None:
            lengths = torch.full((bsz,), length, dtype=torch.long, device=input_ids.device)
        positions = torch.arange(length, device=input_ids.device)[None, :]
        doc_start = self._document_starts(input_ids)
        token_ids = input_ids if self._scores_hash_token_ids else None  # rolled: each token keeps its own id
        info = SequenceInfo(positions, self._rope(positions), valid, lengths, bool(use_cache), doc_start, token_ids)
        x = self.embed_tokens(input_ids)
        hidden_states = [] if output_hidden_states else None
        aux_losses = []
        states = []
        checkpointed = self._checkpointed_layers(info.collect_state)
        for layer in self.layers:
            if hidden_states is not None:
                hidden_states.append(x)
            if layer in checkpointed and x.device.type == "xla":  # torch_xla's checkpoint (see ``recompute``)
                x, aux, state = recompute(layer.__call__, x, info)
            elif layer in checkpointed:  # keeps x (and info) only; the block's forward runs again in the backward
                x, aux, state = layer._gradient_checkpointing_func(layer.__call__, x, info)
            else:
                x, aux, state = layer(x, info)
            if aux is not None:
                aux_losses.append(aux)
            states.append(state)
        x = self.norm(x)
        if hidden_states is not None:
            hidden_states.append(x)
            hidden_states = [_roll_rows(t, -shift) if shift is not None else t for t in hidden_states]
        if shift is not None:
            x = _roll_rows(x, -shift)
        new_cache = None
        if use_cache:
            next_doc = None
            if doc_start is not None:  # the document start of each row's next token
                last = (lengths - 1)[:, None]
                ended = torch.gather(input_ids, 1, last)[:, 0] == self.config.eos_token_id
                next_doc = torch.where(ended, lengths, torch.gather(doc_start, 1, last)[:, 0])
            new_cache = BMojoCache(self.config, states, lengths.clone(), next_doc)
        innovation = torch.stack(aux_losses).mean() if aux_losses else None
        out = BMojoModelOutput(x, new_cache, tuple(hidden_states) if hidden_states else None, innovation)
        return out if return_dict else out.to_tuple()

    def _checkpointed_layers(self, collect_state: bool) -> list[BMojoBlock]:
        """The blocks whose forward this parallel forward checkpoints: those marked by
        ``gradient_checkpointing_enable()`` when in training mode with gradients enabled, and none when the
        forward collects the decoding state (``use_cache=True``; a warning says so)."""
        marked = [layer for layer in self.layers if layer.gradient_checkpointing and layer.training]
        if not marked or not torch.is_grad_enabled():
            return []
        if collect_state:
            logger.warning_once(
                "use_cache=True collects the decoding state: this forward runs without gradient checkpointing"
            )
            return []
        return marked

    @property
    def _resets_at_documents(self) -> bool:
        cfg = self.config
        return bool(cfg.memory_reset_at_document and cfg.eidetic and "bmojo" in cfg.layers_block_type)

    @property
    def _scores_hash_token_ids(self) -> bool:
        """Whether some layer's selection score hashes the token ids (``selection_score="random"``): only then do
        the layers receive them (``SequenceInfo.token_ids``, ``step(token_ids=...)``)."""
        cfg = self.config
        return bool(cfg.selection_score == "random" and cfg.eidetic and "bmojo" in cfg.layers_block_type)

    def _document_starts(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """``[B, L]`` long, the first position of each token's document (``memory_reset_at_document``), else None."""
        if not self._resets_at_documents:
            return None
        if self.config.eos_token_id is None:
            raise ValueError("memory_reset_at_document needs eos_token_id (the end-of-document token)")
        return document_starts(input_ids, self.config.eos_token_id)

    def _decode(self, input_ids, cache: BMojoCache, output_hidden_states) -> BMojoModelOutput:
        if input_ids.shape[0] != cache.batch_size:
            raise ValueError(f"input_ids has {input_ids.shape[0]} rows but the cache holds {cache.batch_size}")
        outputs, per_layer = [], []
        for t in range(input_ids.shape[1]):
            layer_inputs = [] if output_hidden_states else None
            outputs.append(self.step(input_ids[:, t], cache, layer_inputs))
            per_layer.append(layer_inputs)
        hidden_states = None
        if output_hidden_states:  # same layout as the parallel forward: one [B, L, d] per layer input + final
            hidden_states = tuple(torch.stack(h, dim=1) for h in zip(*per_layer))
        return BMojoModelOutput(torch.stack(outputs, dim=1), cache, hidden_states, None)

    def step(self, token: torch.Tensor, cache: BMojoCache, hidden_states: list | None = None) -> torch.Tensor:
        """Decode one token per row (``token [B]``): returns the final hidden state ``[B, d]``.

        ``hidden_states``, if a list, receives every layer's input and then the final hidden state (each ``[B, d]``).
        """
        positions = cache.positions[:, None]  # [B, 1]: the shape of a parallel forward's [1, L]
        doc_start = None
        if self._resets_at_documents:
            if cache.doc_start is None:
                raise ValueError("memory_reset_at_document is on but the cache has no doc_start")
            doc_start = cache.doc_start  # this token's document start
        token_ids = token if self._scores_hash_token_ids else None
        info = StepInfo(positions, self._rope(positions), doc_start, token_ids)  # shared by every layer
        x = self.embed_tokens(token)
        for layer, state in zip(self.layers, cache.layers):
            if hidden_states is not None:
                hidden_states.append(x)
            x = layer.step(x, state, info)
        if doc_start is not None:  # after an end-of-document token the next document starts
            cache.doc_start = torch.where(token == self.config.eos_token_id, cache.positions + 1, doc_start)
        cache.positions = cache.positions + 1
        x = self.norm(x)
        if hidden_states is not None:
            hidden_states.append(x)
        return x


def _refuse_unsupported_outputs(kwargs: dict) -> None:
    if kwargs.get("output_attentions"):
        raise ValueError(
            "output_attentions is not supported: a B'MOJO layer attends under one softmax over window, fading and "
            "eidetic keys, which has no per-token attention map"
        )


def document_starts(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """``input_ids [B, L]`` of packed documents, each ending with ``eos_token_id`` -> ``[B, L]`` long: the first
    position of each token's document (0, or the position right after the latest end-of-document token before it).

    A prefix maximum of ``j + 1`` over earlier end tokens ``j``, with static shapes and no scan: a masked maximum
    within blocks of ``S ~ sqrt(L)`` positions, then over the blocks before (``O(B L sqrt(L))`` work)."""
    bsz, length = input_ids.shape
    device = input_ids.device
    pos = torch.arange(length, device=device)
    # after[i] = i when token i - 1 ends a document, else 0; the answer is the maximum of after[0..i].
    after = F.pad(torch.where(input_ids == eos_token_id, pos + 1, 0), [1, 0])[:, :length]
    block = max(1, math.isqrt(length - 1) + 1)
    blocks = -(-length // block)
    after = F.pad(after, [0, blocks * block - length]).view(bsz, blocks, block)
    lane = torch.arange(block, device=device)
    within = torch.where(lane[None, :] <= lane[:, None], after[:, :, None, :], 0).amax(-1)  # [B, nb, S]
    ahead = torch.arange(blocks, device=device)
    carry = torch.where(ahead[None, :] < ahead[:, None], within[:, None, :, -1], 0).amax(-1)  # [B, nb]
    return torch.maximum(within, carry[..., None]).flatten(1)[:, :length]


def _roll_rows(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Row ``b`` of the result is row ``b`` of ``x`` rotated left by ``shift[b]`` along dim 1."""
    length = x.shape[1]
    idx = torch.remainder(torch.arange(length, device=x.device)[None, :] + shift[:, None], length)
    idx = idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return torch.gather(x, 1, idx)


# ---------------------------------------------------------------------------------------------------------------
# Causal LM
# ---------------------------------------------------------------------------------------------------------------
class BMojoForCausalLM(BMojoPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: BMojoConfig):
        super().__init__(config)
        self.model = BMojoModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cache: BMojoCache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> BMojoCausalLMOutput | tuple:
        """Logits ``[B, L, vocab]``; with ``labels [B, L]`` (``-100`` ignored) the shifted next-token loss.

        ``cache`` (or ``cache_params`` / ``past_key_values``) decodes from a fixed-size state, see ``BMojoModel``.
        """
        cache = pop_cache_argument(cache, kwargs)
        _refuse_unsupported_outputs(kwargs)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        out = self.model(
            input_ids,
            attention_mask=attention_mask,
            cache=cache,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = lm_loss = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(input_ids.shape)}")
            lm_loss = F.cross_entropy(
                at_least_fp32(logits[:, :-1]).flatten(0, 1),
                labels[:, 1:].flatten().to(logits.device),
                ignore_index=-100,
            )
            loss = lm_loss
            if out.innovation_loss is not None:
                loss = lm_loss + self.config.innovation_loss_weight * out.innovation_loss
        result = BMojoCausalLMOutput(loss, logits, lm_loss, out.innovation_loss, out.cache, out.hidden_states)
        return result if return_dict else result.to_tuple()

    # generate() support ----------------------------------------------------------------------------------------------
    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # we bring our own fixed-size cache (``BMojoCache``)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, use_cache=True, **kwargs):
        # transformers passes the cache under CACHE_KWARG; a user may pass it under any alias.
        cache = pop_cache_argument(kwargs.get("cache"), {k: kwargs.get(k) for k in CACHE_ALIASES[1:]})
        inputs = {k: kwargs[k] for k in ("output_hidden_states", "logits_to_keep") if kwargs.get(k) is not None}
        if cache is not None:
            # The cache already holds every token but the newest one: feed exactly one token per step.
            return {**inputs, "input_ids": input_ids[:, -1:], "cache": cache, "use_cache": True}
        return {**inputs, "input_ids": input_ids, "attention_mask": attention_mask, "use_cache": use_cache}

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False, num_new_tokens=1):
        for name in CACHE_ALIASES:
            model_kwargs.pop(name, None)
        if outputs.cache is not None:  # (use_cache=False: no cache, and no key that beam search would reorder)
            model_kwargs[CACHE_KWARG] = outputs.cache
        mask = model_kwargs.get("attention_mask")
        if mask is not None:
            model_kwargs["attention_mask"] = torch.cat([mask, mask.new_ones(mask.shape[0], num_new_tokens)], dim=-1)
        return model_kwargs

    def _reorder_cache(self, cache, beam_idx):
        return None if cache is None else cache.reorder_cache(beam_idx)
