"""Priming a converted model (``bmojo train --init DIR [--teacher SRC] [--trainable GROUPS]``): which parameters
train, and the distillation term.

The recipe is hybrid-model-factory's "Priming" (awslabs/hybrid-model-factory, ``docs/Priming.md``, commit
``737290d``): start the hybrid from the Transformer's weights (their Stage 0, our ``bmojo convert``), first train
only the new sequence-mixing parameters against the frozen Transformer (their Stage 1, "SSM parameters only"),
then fine-tune more of the model (their Stage 2, "typically SSM + Attention + norms"). Two differences, both
deliberate: their Stage 1 matches the final hidden states of a fused teacher path by MSE; here the teacher is the
source model itself and the term is ``KL(teacher || student)`` on the next-token distributions (temperature 1),
added to the LM loss with weight ``--distill-weight``. And since a converted B'MOJO starts *as* the source (the
key-set biases silence the new paths), no layer has to be fitted to its teacher before the model is usable: the
memories open as far as the loss asks them to.

Parameter groups (``--trainable``, comma-separated):

| group | parameters |
|---|---|
| ``ssm`` | every Mamba-2 SSM's (the fading path of ``bmojo`` layers, and ``ssm`` layers) |
| ``memory`` | a ``bmojo`` mixer's other parameters: key-set biases, innovation predictor, learned selection |
| ``new`` | ``ssm`` + ``memory``: what ``bmojo convert`` adds to the source |
| ``attention`` | query/key/value/output projections |
| ``mlp`` | the MLPs |
| ``norm`` | the RMSNorms of the blocks and the final one (the SSM's gated norm is ``ssm``) |
| ``embeddings`` | token embeddings and the LM head |
| ``all`` | everything (the default) |
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from .errors import BMojoError

GROUPS = ("ssm", "memory", "attention", "mlp", "norm", "embeddings")
ALIASES = {"new": ("ssm", "memory"), "all": GROUPS}
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
KEY_SET_BIASES = ("fading_bias", "self_fading_bias", "eidetic_bias")


def parse_trainable(spec: str) -> set[str]:
    """``--trainable``: the set of groups it names; ``ValueError`` naming an unknown one."""
    chosen: set[str] = set()
    for name in (part.strip() for part in spec.split(",")):
        if name in ALIASES:
            chosen.update(ALIASES[name])
        elif name in GROUPS:
            chosen.add(name)
        else:
            raise ValueError(f"unknown parameter group {name!r}; choose from {', '.join((*ALIASES, *GROUPS))}")
    return chosen


def parameter_group(name: str, layer_types: list[str]) -> str:
    """The group of parameter ``name`` of a ``BMojoForCausalLM`` whose layers have ``layer_types``."""
    if name.startswith(("model.embed_tokens.", "lm_head.")):
        return "embeddings"
    if name.startswith("model.norm."):
        return "norm"
    m = _LAYER.fullmatch(name)
    if m:
        rest = m.group(2)
        if rest.startswith(("input_norm.", "post_mixer_norm.")):
            return "norm"
        if rest.startswith("mlp."):
            return "mlp"
        if rest.startswith("mixer."):
            part = rest.split(".")[1]
            if layer_types[int(m.group(1))] == "ssm" or part == "ssm":
                return "ssm"
            return "attention" if part in _ATTENTION else "memory"
    raise RuntimeError(f"parameter {name!r} belongs to no priming group (bmojo.priming.parameter_group)")


def set_trainable(model, spec: str) -> int:
    """Freeze every parameter outside the groups of ``spec`` (``requires_grad``); returns the number of trainable
    elements. ``BMojoError`` when the groups hold no parameter of this model."""
    chosen = parse_trainable(spec)
    layer_types = model.config.layers_block_type
    count = 0
    for name, param in model.named_parameters():
        param.requires_grad_(parameter_group(name, layer_types) in chosen)
        count += param.numel() if param.requires_grad else 0
    if count == 0:
        raise BMojoError(f"--trainable {spec!r} selects no parameter of this model (its groups are empty)")
    return count


def set_key_set_biases(model, value: float) -> None:
    """Set every key-set bias (``fading_bias``, ``self_fading_bias``, ``eidetic_bias`` of the ``bmojo`` layers) to
    ``value``; ``BMojoError`` when the model has none (``key_set_bias`` off, or no ``bmojo`` layer)."""
    found = [p for name, p in model.named_parameters() if name.rsplit(".", 1)[-1] in KEY_SET_BIASES]
    if not found:
        raise BMojoError("--key-set-bias-start: the model has no key-set biases (model.key_set_bias is off)")
    with torch.no_grad():
        for param in found:
            param.fill_(value)


def key_set_bias_values(model) -> dict[str, torch.Tensor]:
    """Every key-set bias by parameter name (detached copies), to watch the gates open."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] in KEY_SET_BIASES}


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """``KL(teacher || student)`` of the next-token distributions at temperature 1, summed over the vocabulary
    and averaged over positions: ``mean_t sum_v p_t(v) (log p_t(v) - log q_t(v))``; logits ``[B, L, V]``,
    computed in float32 (float64 stays float64). The teacher's side carries no gradient."""
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    log_q = F.log_softmax(student_logits.to(dtype), dim=-1)
    log_p = F.log_softmax(teacher_logits.detach().to(dtype), dim=-1)
    # Written out rather than F.kl_div, which torch-xla 2.9 backpropagates through an unregistered kernel.
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def load_teacher(path: str, vocab_size: int, dtype: torch.dtype):
    """The frozen teacher: ``AutoModelForCausalLM`` from the local directory ``path`` (no remote code), in eval
    mode, its vocabulary checked against the student's."""
    from transformers import AutoModelForCausalLM

    try:
        teacher = AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, trust_remote_code=False, dtype=dtype
        )
    except Exception as exc:  # transformers raises many kinds (OSError, ValueError, ...)
        raise BMojoError(f"cannot load the teacher {path!r}: {' '.join(str(exc).split())[:300]}") from exc
    if teacher.config.vocab_size != vocab_size:
        raise BMojoError(
            f"the teacher {path!r} has vocab_size {teacher.config.vocab_size} but the model has {vocab_size}: "
            "distillation compares distributions over the same vocabulary"
        )
    teacher.eval().requires_grad_(False)
    return teacher
