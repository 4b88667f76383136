"""The tensor-parallel sharding plan of a B'MOJO model, declared (like transformers' ``base_model_tp_plan``).

Two tables, both pure functions of the configuration (no model is built, nothing is imported from the model):

* ``TP_PLAN``: module name pattern -> style, how ``shard_model`` treats the module (``*`` matches one name part);
* ``parameter_rules(config)``: every sharded parameter -> the ``Split`` of it that each rank keeps; the same rules
  split and merge checkpoints (``split_state_dict`` / ``merge_state_dicts``).

Styles: ``"colwise"`` (a linear layer keeps output rows: Megatron's column-parallel layer), ``"rowwise"`` (keeps
input columns and sums the partial outputs over ranks), ``"sliced"`` (the module's own parameters are sliced in
place: conv channels, per-head vectors, the gated norm's groups), ``"sum_over_shards"`` (a ``PartialSum`` hook
point, bound to the backend's all-reduce), ``"copy_to_shards"`` (a ``SumGradientOverShards`` hook point, bound to
the backend's identity whose backward all-reduces the gradient). Modules read their local sizes from their
(sliced) weights, so nothing else changes in a sharded model.

| module | parameter | split | rank ``r`` of ``tp`` keeps |
|---|---|---|---|
| attention | ``q_proj.weight`` | rows (column-parallel) | query heads ``[r*Hq/tp, (r+1)*Hq/tp)`` |
| attention | ``k_proj``, ``v_proj`` ``.weight`` | rows (column-parallel) | key/value heads ``[r*Hkv/tp, ...)`` |
| attention | ``q_proj``, ``k_proj``, ``v_proj`` ``.bias`` (``attention_bias``) | by output row | its heads' entries |
| attention | ``innovation_predictor.weight/.bias`` | rows (column-parallel) | the same key heads |
| attention | ``o_proj.weight`` | columns (row-parallel) | its query heads' inputs |
| attention | ``fading_bias``, ``self_fading_bias``, ``eidetic_bias`` (``key_set_bias``) | by head | its query heads |
| SSM | ``in_proj.weight`` | rows, per segment ``[z, x, B, C, dt]`` | its z, x parts; its groups' B, C; its heads' dt |
| SSM | ``conv1d.weight/.bias`` | channels, per segment ``[x, B, C]`` | the channels matching ``in_proj`` |
| SSM | ``A_log``, ``D``, ``dt_bias`` | by head | its SSM heads |
| SSM | ``norm.weight`` (gated) | by group | its groups (the norm is per group: no cross-rank statistics) |
| SSM | ``out_proj.weight`` | columns (row-parallel) | its heads' inputs |
| MLP | ``gate_proj``, ``up_proj`` ``.weight`` | rows (column-parallel) | ``intermediate_size/tp`` units |
| MLP | ``down_proj.weight`` | columns (row-parallel) | the same units |
| — | embeddings, LM head, RMSNorms | replicated | everything |
| attention | ``input_predictor`` (``selection_score="next_input"``), ``selection_bias`` | replicated | everything |

Heads, groups and key/value heads are contiguous blocks, so rank ``r``'s query heads read exactly its key/value
heads (GQA) and its SSM heads read exactly its ``B``/``C`` groups. Column-parallel layers are the identity on
their input in the forward and all-reduce the input's gradient in the backward (Megatron's ``f``); row-parallel
layers all-reduce their output in the forward and pass the gradient through (``g``). The residual stream, the
fading tokens (output of the SSM's row-parallel ``out_proj``) and the loss are therefore replicated on every rank.

The innovation score sums the squared prediction error over every key feature; each rank holds some key heads, so
the B'MOJO layer's ``innovation_sum`` (style ``"sum_over_shards"``) becomes a ``g`` all-reduce: the score is
identical on every rank (hence the same eidetic selection, and memory slots holding the rank's own key/value
heads), and since the loss is replicated rather than summed over ranks, the backward is the identity: each rank's
predictor shard gets exactly the gradient it has in the full model (``backends._SumOverShards``).

``learned_selection``'s ``selection_bias`` is replicated and reads the replicated layer input ``h`` directly (not
through a column-parallel layer), so its ``u`` is the same on every rank (hence the same selection); but ``u`` is
added to the eidetic logits of the rank's own heads only, so each rank's gradient of ``u`` is a partial sum over
heads. The layer's ``selection_bias_gradient_sum`` (style ``"copy_to_shards"``) all-reduces it in the backward
(Megatron's ``f``, ``backends._CopyToShards``): every rank then holds the full gradient of ``selection_bias`` and
adds the same full ``W^T du`` to the gradient of ``h``, as every replicated module must. No double count: the
column-parallel layers' own ``f`` all-reduce only the gradient that flows through them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..configuration_bmojo import BMojoConfig

# Module name (relative to BMojoForCausalLM) -> style. SSM entries appear twice: the mixer of an "ssm" layer and
# the SSM inside a "bmojo" layer. Modules not listed (embeddings, LM head, RMSNorms) are replicated.
TP_PLAN: dict[str, str] = {
    "model.layers.*.mixer.q_proj": "colwise",
    "model.layers.*.mixer.k_proj": "colwise",
    "model.layers.*.mixer.v_proj": "colwise",
    "model.layers.*.mixer.o_proj": "rowwise",
    "model.layers.*.mixer.innovation_predictor": "colwise",
    "model.layers.*.mixer.innovation_sum": "sum_over_shards",
    "model.layers.*.mixer.selection_bias_gradient_sum": "copy_to_shards",
    "model.layers.*.mixer": "sliced",  # an SSM mixer's dt_bias, A_log, D
    "model.layers.*.mixer.in_proj": "colwise",
    "model.layers.*.mixer.conv1d": "sliced",
    "model.layers.*.mixer.norm": "sliced",
    "model.layers.*.mixer.out_proj": "rowwise",
    "model.layers.*.mixer.ssm": "sliced",
    "model.layers.*.mixer.ssm.in_proj": "colwise",
    "model.layers.*.mixer.ssm.conv1d": "sliced",
    "model.layers.*.mixer.ssm.norm": "sliced",
    "model.layers.*.mixer.ssm.out_proj": "rowwise",
    "model.layers.*.mlp.gate_proj": "colwise",
    "model.layers.*.mlp.up_proj": "colwise",
    "model.layers.*.mlp.down_proj": "rowwise",
}
_PATTERNS = [(re.compile(re.escape(p).replace(r"\*", r"[^.]+") + "$"), style) for p, style in TP_PLAN.items()]


def plan_style(module_name: str) -> str | None:
    """The ``TP_PLAN`` style of a module (``None``: replicated)."""
    for pattern, style in _PATTERNS:
        if pattern.match(module_name):
            return style
    return None


@dataclass(frozen=True)
class Split:
    """Along ``dim`` a parameter is the concatenation of ``segments`` (global sizes); rank ``r`` keeps the
    ``r``-th equal part of every segment, concatenated in the same order."""

    dim: int
    segments: tuple[int, ...]

    def local(self, tensor: torch.Tensor, rank: int, size: int) -> torch.Tensor:
        parts = [p.chunk(size, self.dim)[rank] for p in tensor.split(self.segments, dim=self.dim)]
        return torch.cat(parts, self.dim).contiguous()

    def merge(self, shards: list[torch.Tensor]) -> torch.Tensor:
        local_sizes = [s // len(shards) for s in self.segments]
        per_rank = [t.split(local_sizes, dim=self.dim) for t in shards]
        segments = [torch.cat(parts, self.dim) for parts in zip(*per_rank)]
        return torch.cat(segments, self.dim)


def _column(size: int) -> Split:
    return Split(0, (size,))


def _row(size: int) -> Split:
    return Split(1, (size,))


def attention_rules(config: BMojoConfig, layer_type: str) -> dict[str, Split]:
    """Rules of an attention-bearing mixer (``SlidingWindowAttention``, ``BMojoMixer``; names relative to the
    module); a B'MOJO layer's own SSM is not included."""
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    rules = {
        "q_proj.weight": _column(q),
        "k_proj.weight": _column(kv),
        "v_proj.weight": _column(kv),
        "o_proj.weight": _row(q),
    }
    if config.attention_bias:  # cut like the output rows they are added to
        rules.update({"q_proj.bias": _column(q), "k_proj.bias": _column(kv), "v_proj.bias": _column(kv)})
    # Only the key predictor is sharded (by key heads). selection_score="next_input"'s input_predictor maps the
    # replicated fading token to the replicated layer input: it is replicated, its score needs no sum over ranks.
    if layer_type == "bmojo" and config.eidetic and config.selection_score == "key_prediction":
        rules["innovation_predictor.weight"] = _column(kv)
        rules["innovation_predictor.bias"] = _column(kv)
    if layer_type == "bmojo" and config.key_set_bias:  # per query head, for the key sets the layer has
        present = {"fading_bias": config.use_fading, "self_fading_bias": config.fading_self_key,
                   "eidetic_bias": config.eidetic}
        rules.update({name: _column(config.num_attention_heads) for name, on in present.items() if on})
    return rules


def ssm_rules(config: BMojoConfig) -> dict[str, Split]:
    """Rules of a ``Mamba2Mixer`` (names relative to the module)."""
    inner, heads = config.ssm_inner_size, config.ssm_num_heads
    bc = config.ssm_ngroups * config.ssm_state_size
    conv = Split(0, (inner, bc, bc))  # conv channels are [x, B, C]
    return {
        "in_proj.weight": Split(0, (inner, inner, bc, bc, heads)),  # rows are [z, x, B, C, dt]
        "conv1d.weight": conv,
        "conv1d.bias": conv,
        "dt_bias": _column(heads),
        "A_log": _column(heads),
        "D": _column(heads),
        "norm.weight": _column(inner),  # heads and norm groups are both contiguous channel blocks
        "out_proj.weight": _row(inner),
    }


def mlp_rules(config: BMojoConfig) -> dict[str, Split]:
    """Rules of a ``BMojoMLP`` (names relative to the module)."""
    width = config.intermediate_size
    return {"gate_proj.weight": _column(width), "up_proj.weight": _column(width), "down_proj.weight": _row(width)}


def parameter_rules(config: BMojoConfig) -> dict[str, Split]:
    """Every sharded parameter of ``BMojoForCausalLM(config)`` by its full name; parameters not listed
    (embeddings, LM head, RMSNorms) are replicated."""
    rules: dict[str, Split] = {}

    def add(prefix, table):
        rules.update({prefix + name: split for name, split in table.items()})

    for i, layer_type in enumerate(config.layers_block_type):
        mixer = f"model.layers.{i}.mixer."
        if layer_type == "ssm":
            add(mixer, ssm_rules(config))
        else:
            add(mixer, attention_rules(config, layer_type))
            if config.layer_has_ssm(layer_type):
                add(mixer + "ssm.", ssm_rules(config))
        if config.use_mlp:
            add(f"model.layers.{i}.mlp.", mlp_rules(config))
    return rules


def check_tp_size(config: BMojoConfig, tp_size: int) -> None:
    """Raise ``ValueError`` naming the config field that ``tp_size`` does not divide (only fields in use count)."""
    if not isinstance(tp_size, int) or isinstance(tp_size, bool) or tp_size < 1:
        raise ValueError(f"tp_size must be a positive integer, got {tp_size!r}")
    fields = {}
    if any(t != "ssm" for t in config.layers_block_type):
        fields["num_attention_heads"] = config.num_attention_heads
        fields["num_key_value_heads"] = config.num_key_value_heads
    if any(config.layer_has_ssm(t) for t in config.layers_block_type):
        fields["ssm_num_heads (ssm_expand * hidden_size / ssm_head_dim)"] = config.ssm_num_heads
        fields["ssm_ngroups"] = config.ssm_ngroups
    if config.use_mlp:
        fields["intermediate_size"] = config.intermediate_size
    for name, value in fields.items():
        if value % tp_size:
            raise ValueError(f"{name} ({value}) must be divisible by the tensor-parallel size ({tp_size})")


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint / gradient conversion (pure tensor functions)
# ---------------------------------------------------------------------------------------------------------------
def split_state_dict(full: dict[str, torch.Tensor], config: BMojoConfig, tp_size: int) -> list[dict[str, torch.Tensor]]:
    """A full state dict -> one state dict per rank, with the same keys (replicated tensors are shared)."""
    check_tp_size(config, tp_size)
    rules = parameter_rules(config)
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(tp_size)]
    for name, tensor in full.items():
        split = rules.get(name)
        if split is not None and tensor.shape[split.dim] != sum(split.segments):
            expected = sum(split.segments)
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {expected} along dim {split.dim}")
        for rank in range(tp_size):
            shards[rank][name] = tensor if split is None else split.local(tensor, rank, tp_size)
    return shards


def merge_state_dicts(shards: list[dict[str, torch.Tensor]], config: BMojoConfig) -> dict[str, torch.Tensor]:
    """Per-rank state dicts (rank order) -> the full state dict. Replicated tensors must agree on every rank."""
    tp_size = len(shards)
    check_tp_size(config, tp_size)
    keys = list(shards[0])
    for rank, shard in enumerate(shards):
        if set(shard) != set(keys):
            odd = sorted(set(shard) ^ set(keys))
            raise ValueError(f"the state dicts of rank 0 and rank {rank} differ in keys {odd}")
    rules = parameter_rules(config)
    full = {}
    for name in keys:
        tensors = [shard[name] for shard in shards]
        split = rules.get(name)
        if split is None:
            if any(not torch.equal(tensors[0], t) for t in tensors[1:]):
                raise ValueError(f"replicated tensor {name} differs between ranks")
            full[name] = tensors[0]
        else:
            full[name] = split.merge(tensors)
    return full
