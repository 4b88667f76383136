"""What every mixer shares: the call shape (``SequenceInfo`` in, ``MixerOutput`` out), rotary angles, and the base
of the typed decoding states.

Every mixer (``Mamba2Mixer``, ``SlidingWindowAttention``, ``BMojoMixer``) has

* ``forward(h [B, L, d], info: SequenceInfo) -> MixerOutput(out [B, L, d], aux_loss or None, state or None)``;
* ``step(h [B, d], state, info: StepInfo) -> out [B, d]``, updating ``state`` in place (``StepInfo``: the token's
  position, rotary angles, document start and id, and what every layer of the step shares);
* ``allocate_inference_state(config, batch_size, device, dtype)``: the empty state its ``step`` updates,

so that ``BMojoBlock`` runs any of them without asking which it holds.

Mixers call their sequence ops through ``run_op``, which can recompute an op in the backward instead of keeping its
intermediates (``recompute_ops``; ``BMojoPreTrainedModel.selective_recompute_enable``).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.utils import _pytree as pytree
from torch.utils.checkpoint import checkpoint

from ..ops import dispatch

# The sequence ops a mixer may recompute in the backward (``run_op``): their intermediates are most of what a B'MOJO
# layer keeps for the backward (the attention's concatenated key sets, the SSD's chunk matrices), their inputs little.
RECOMPUTABLE_OPS = ("attention", "ssd")


class Rope(NamedTuple):
    """Rotary angles: ``cos, sin [B or 1, L, D/2]`` at the tokens' positions; ``eid_cos, eid_sin [1, 1, D/2]``: the
    fixed rotation of eidetic scores (every eidetic key is scored as if it sat ``2W`` before the query), ``None``
    where no layer uses it (``eidetic_key_distance="zero"``)."""

    cos: torch.Tensor
    sin: torch.Tensor
    eid_cos: torch.Tensor | None
    eid_sin: torch.Tensor | None


@dataclass
class SequenceInfo:
    """What every mixer needs to know about the (rolled, right-padded) batch in a parallel forward."""

    positions: torch.Tensor  # [1, L] long: the same shape as a decoding step's [B, 1]
    rope: Rope
    valid: torch.Tensor | None  # [B, L] bool, None when nothing is padded
    lengths: torch.Tensor | None  # [B] long; set when the decoding state must be collected
    collect_state: bool
    # [B, L] long: first position of each token's document (memory_reset_at_document), else None
    doc_start: torch.Tensor | None = None
    # [B, L] long: the (rolled) token ids, for selection_score="random" (the score hashes them), else None
    token_ids: torch.Tensor | None = None


@dataclass
class StepInfo:
    """What every mixer needs to know about the token of a decoding step (one per row), built once per step by the
    model: ``positions [B, 1]`` (long), ``rope`` (``cos, sin [B, 1, D/2]``; ``eid_cos, eid_sin`` ``None`` where no
    layer rotates eidetic queries), ``doc_start [B]`` (``memory_reset_at_document``) and ``token_ids [B]``
    (``selection_score="random"``), else ``None``.

    A decoding step runs a few ops per tensor, so it is bound by their count: what only depends on the positions
    (the ring slot written, the chunk boundary) is made once per step for every layer (``shared``), not per layer.
    """

    positions: torch.Tensor
    rope: Rope
    doc_start: torch.Tensor | None = None
    token_ids: torch.Tensor | None = None
    _shared: dict = dataclasses.field(default_factory=dict, repr=False)

    def shared(self, key, make):
        """``make()``, made on the first call with ``key`` in this step and reused by every later one."""
        if key not in self._shared:
            self._shared[key] = make()
        return self._shared[key]

    def ring_slot(self, ring: int) -> torch.Tensor:
        """``[B, R]`` bool: the slot of a ring of ``ring`` slots that this token's key and value go to (``t % R``)."""
        return self.shared(
            ("ring_slot", ring),
            lambda: torch.arange(ring, device=self.positions.device) == torch.remainder(self.positions, ring),
        )

    @property
    def eager_cpu(self) -> bool:
        """Whether this step runs op by op on the CPU: not on XLA, not traced, not compiled. Only there may a step
        read a value on the host or write a state by index; a graph keeps the static, masked form (same values)."""
        if self.positions.device.type != "cpu":
            return False
        return not (torch.jit.is_tracing() or torch.compiler.is_compiling())

    def any_chunk_start(self, chunk_size: int) -> bool:
        """Whether some row's token opens a chunk after the first (its boundary work must run), read on the host
        in eager CPU decoding only: ``True`` elsewhere (``eager_cpu``), where a value must not choose the graph (the
        boundary work then runs in every step, masked by ``chunk_start``; the same values)."""
        if not self.eager_cpu:
            return True
        # static-graph: ok (eager CPU only, guarded above; a traced or XLA graph never reads it)
        return self.shared(("any_chunk_start", chunk_size), lambda: bool(self.chunk_start(chunk_size).any()))

    def ring_index(self, ring: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows, slot)``, ``[B]`` long each: every row's ring slot for this token (``t % R``), as indices."""
        return self.shared(
            ("ring_index", ring),
            lambda: (
                torch.arange(self.positions.shape[0], device=self.positions.device),
                torch.remainder(self.positions[:, 0], ring),
            ),
        )

    def chunk_start(self, chunk_size: int) -> torch.Tensor:
        """``[B, 1]`` bool: whether this token opens a chunk after the first (the chunk before it just ended)."""
        return self.shared(
            ("chunk_start", chunk_size),
            lambda: (torch.remainder(self.positions, chunk_size) == 0) & (self.positions > 0),
        )


def run_op(mixer: torch.nn.Module, op: str, *args, call=None, **kwargs):
    """``dispatch(op)(*args, **kwargs)``, recomputed in the backward when ``op`` is in ``mixer.recompute_ops`` and
    the call records a graph for a backward (``mixer.training`` and gradients enabled).

    Recomputed (selective activation recomputation; Korthikanti et al., "Reducing Activation Recomputation in Large
    Transformer Models", 2022, Sec. 4.2, there for the attention core): the op's inputs are kept, its intermediates
    are not, and the backward runs its forward once more (``recompute``). The ops are pure functions of their
    inputs, so every number is the same.

    ``call``: a function ``call(fn, *args, **kwargs)`` that runs the dispatched op ``fn`` itself, e.g. after
    assembling a block's inputs from pieces (``ops.attention.common.KeyContextBlock``); recomputed, all of it runs
    again in the backward, so what it builds is not kept either. Arguments may nest tensors in tuples, dicts and
    named tuples (``EideticMemory``).
    """
    fn = dispatch(op)
    if call is not None:
        fn = functools.partial(call, fn)
    if op in mixer.recompute_ops and mixer.training and torch.is_grad_enabled():
        return recompute(fn, *args, **kwargs)
    return fn(*args, **kwargs)


def recompute(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` without keeping its intermediates: the backward runs ``fn`` again (activation
    checkpointing). ``torch.utils.checkpoint`` (non-reentrant); on an XLA device ``torch_xla.utils.checkpoint``
    (reentrant), whose optimization barriers keep XLA's common-subexpression elimination from merging the
    recomputation back into the forward (plain ``torch.utils.checkpoint`` may save nothing there).

    Every tensor of the arguments, however nested (tuples, dicts, named tuples: a block's pieces, the eidetic
    memory), is passed to the checkpoint as an input of its own. The non-reentrant checkpoint keeps tensor inputs as
    saved tensors, which an enclosing checkpoint (the layer's, with both on) drops and recomputes, but holds any other
    argument as it is, with the tensors inside it, until the backward (measured: one layer's forward at 8K held
    32 MiB more with a block's pieces nested). The reentrant one runs ``fn``'s backward only when some input
    requires a gradient (parameters read inside ``fn`` get theirs from that backward), so where none does (frozen
    embeddings feeding a checkpointed layer) an empty tensor that requires one is passed as well."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    tensors = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
    template = [None if isinstance(x, torch.Tensor) else x for x in leaves]  # holds no tensor

    def run(*inputs):
        filled = list(template)
        for i, x in zip(tensors, inputs):
            filled[i] = x
        call_args, call_kwargs = pytree.tree_unflatten(filled, spec)
        return fn(*call_args, **call_kwargs)

    inputs = [leaves[i] for i in tensors]
    if any(x.device.type == "xla" for x in inputs):
        from torch_xla.utils.checkpoint import checkpoint as xla_checkpoint

        if not any(x.requires_grad for x in inputs):  # run() reads the first len(tensors) inputs only
            inputs.append(torch.empty(0, device=inputs[0].device, requires_grad=True))
        return xla_checkpoint(run, *inputs)
    return checkpoint(run, *inputs, use_reentrant=False)


def sequence_block(config, x: torch.Tensor, chunk: int) -> int | None:
    """Tokens per call of a sequence op over ``x [B, L, ...]``: ``config.sequence_block_size`` rounded down to whole
    chunks of ``chunk`` (at least one), or ``None`` (the whole sequence in one call): where it is not set, where
    the sequence fits in one block, on an XLA device, and in a traced or compiled graph (``torch.jit.trace``, the
    CPU stand-in of ``torch_neuronx.trace``; ``torch.compile``): the ops are traced whole, the compiler schedules the
    graph, blocks would only add ops."""
    block = getattr(config, "sequence_block_size", None)
    if not block or block >= x.shape[1] or x.device.type == "xla":
        return None
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return None
    return max(chunk, block // chunk * chunk)


class MixerOutput(NamedTuple):
    out: torch.Tensor  # [B, L, d]
    aux_loss: torch.Tensor | None  # a scalar to add to the training loss (the innovation loss), or None
    state: "InferenceState | None"  # the decoding state after each row's last token (info.collect_state)


class InferenceState:
    """Base of the typed decoding states: dataclasses whose fields are tensors, nested states, or ``None`` (a part
    the layer does not have). States are updated in place while decoding; their size never depends on how many
    tokens were seen.

    ``tensors()`` names every tensor by a flat name (``conv``, ``ring_k``, ``mem_pos``, ...) for export and
    accounting; nested states declare their type in the field's metadata (``state_field``).
    """

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the state by its flat name, in declaration order."""
        out: dict[str, torch.Tensor] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, InferenceState):
                out.update(value.tensors())
            elif value is not None:
                out[f.name] = value
        return out

    def map_(self, fn) -> None:
        """Replace every tensor ``t`` by ``fn(t)`` (e.g. select rows for beam search)."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, InferenceState):
                value.map_(fn)
            elif value is not None:
                setattr(self, f.name, fn(value))

    @classmethod
    def names(cls) -> list[str]:
        """Every flat name this state type can hold."""
        out = []
        for f in dataclasses.fields(cls):
            sub = f.metadata.get("state")
            out.extend(sub.names() if sub is not None else [f.name])
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]):
        """The inverse of ``tensors()`` (tensors used as they are); a nested part with no tensor is ``None``."""
        kwargs = {}
        for f in dataclasses.fields(cls):
            sub = f.metadata.get("state")
            if sub is None:
                kwargs[f.name] = tensors.get(f.name)
            else:
                kwargs[f.name] = sub.from_tensors(tensors) if any(n in tensors for n in sub.names()) else None
        return cls(**kwargs)


def state_field(state_type: type[InferenceState]):
    """A dataclass field holding a nested state of ``state_type`` (or ``None``)."""
    return dataclasses.field(default=None, metadata={"state": state_type})

