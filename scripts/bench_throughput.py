"""Throughput side by side, in one run: B'MOJO against its special cases (sliding-window attention, full
attention, Mamba-2) and against transformers' LlamaForCausalLM, MistralForCausalLM (sliding window) and
Mamba2ForCausalLM, all at (about) equal parameter counts, on this CPU.

    python scripts/bench_throughput.py --threads 1 2           # writes docs/throughput.{md,json,png}
    python scripts/bench_throughput.py --quick --threads 1     # fewer rounds, shorter decode runs (~10 min)
    python scripts/bench_throughput.py --checkpointing ...     # also B'MOJO with activation checkpointing
    python scripts/bench_throughput.py --selective-recompute ... # also B'MOJO recomputing its attention and SSD ops
    python scripts/bench_throughput.py --compile ...           # also B'MOJO and Llama under torch.compile

Measures, for each thread count in ``--threads``:

* training tokens/s at each ``--train-lengths`` L (forward + backward + AdamW step, batch ``--train-batch``); the
  rounds interleave the models (so machine noise hits them alike) and the median per model is reported;
* activation memory of a training step at each L: the bytes of the tensors autograd saves for the backward (each
  storage counted once, parameters excluded) - what grows with L; parameters, gradients and AdamW state are equal
  across models (equal parameter counts);
* with ``--peak-memory``: the peak resident memory of one training step at each L, each model in its own process
  (the step's activations, gradients, AdamW state and temporaries above the resident weights; Linux's
  ``/proc/self/clear_refs`` resets the peak; glibc's mmap threshold fixed, so that freed blocks go back to the OS
  and the peak follows the live tensors, not the allocator's history): the issue's "peak training memory", which the
  saved-tensor count understates for a checkpointed model (its backward recomputes one layer's activations at a
  time);
* decode ms/token after a context of 1K ... 32K tokens, and the bytes of decoding state at that point;
* the *ideal* FLOP ratio next to every measured ratio (``ideal_train_flops``): what the measured ratio would be if
  every model reached the same FLOP/s, so the efficiency gap is visible.

``--checkpointing`` adds "B'MOJO, activation checkpointing" (the same model after ``gradient_checkpointing_enable()``:
each layer's forward is recomputed in the backward) to the training rounds and the activation memory; its decoding
is B'MOJO's (decoding never checkpoints) and is not measured again. ``--selective-recompute`` likewise adds "B'MOJO,
selective recompute" (after ``selective_recompute_enable()``: the attention and SSD ops are recomputed in the
backward, the rest of the layer is kept); both flags also add "B'MOJO, checkpointing + selective recompute" (the
layers' recomputation then recomputes the attention and SSD ops one block of the sequence at a time,
``sequence_block_size``: the lowest peak). Every model of ours runs its configuration's ``sequence_block_size`` (the
line printed for it says ``seq_block=``). ``--compile`` adds "B'MOJO, torch.compile" and "transformers Llama,
torch.compile": the same models wrapped in ``torch.compile`` (inductor's CPU backend, ``dynamic=False``), measured
in the training rounds only (tokens/s; their memory and decoding are not measured). Each compiles in a warm-up step
at each training length, outside the timed rounds (~6 minutes for B'MOJO's ``cpu`` preset on one core the first
time, under 30 s for Llama; inductor caches what it built under ``/tmp/torchinductor_$USER``), and again at each
thread count (inductor's kernels fix their thread count when generated); with them, every model's untimed warm-up
step runs at the measured shape.

Decoding state: our caches have static shapes and decoding cost does not depend on the values held, so our cache
is created empty and moved to position ``t``. Our full-attention case keeps a ring of ``W >= t`` slots (a
Transformer holds its whole context). transformers' Llama gets a DynamicCache holding ``t`` random keys/values per
layer (Mistral's holds its window); Mamba2's state has a fixed size, so a 64-token prefill stands in for any ``t``.

Each model's configuration is printed and stored in the JSON. Only ratios are meant to be quoted.

Nothing measured is lost: after every measurement the results so far are written to ``OUT/throughput.partial.json``
(removed when the run finishes), and a ``--peak-memory`` child that fails (out of memory: the kernel kills it) is
listed under "Failed measurements" while the run goes on. Render a partial or finished JSON again with

    python scripts/bench_throughput.py --report-only docs/throughput_130m_8k/throughput.partial.json
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5.2x: cache keyword renames

from bmojo import BMojoCache, BMojoForCausalLM, preset_config  # noqa: E402 (after the warnings filter)
from bmojo.checkpoint import write_text_atomic  # noqa: E402
from bmojo.cli import _int_at_least  # noqa: E402 (the CLI's integer flags' parser and wording)
from bmojo.configuration_bmojo import V0_OPTIONS  # noqa: E402
from bmojo.evals.peers import llama_config, mamba2_config  # noqa: E402

REF = "B'MOJO"
CHECKPOINTED = "B'MOJO, activation checkpointing"
RECOMPUTED = "B'MOJO, selective recompute"
BOTH = "B'MOJO, checkpointing + selective recompute"
LLAMA = "transformers Llama"
COMPILED = {REF: "B'MOJO, torch.compile", LLAMA: "transformers Llama, torch.compile"}  # --compile: eager -> compiled
# --skip keys -> the name prefix of the models they leave out (the targets' models, B'MOJO, its SWA case, Llama and
# Mamba2, cannot be skipped)
SKIPPABLE = {"full": "B'MOJO full-attention case", "ssm-case": "B'MOJO Mamba-2 case", "mistral": "transformers Mistral"}
TARGETS = "B'MOJO / Llama >= 1.0 at 2K and >= 1.5 at 8K (training tokens/s); >= 0.9x its SWA case at every L"


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def build_specs(
    preset: str,
    overrides: dict,
    max_length: int,
    checkpointing: bool = False,
    selective_recompute: bool = False,
    compile_models: bool = False,
) -> dict:
    """Name -> (factory(window=None) -> model, kind, our equivalent config). ``window`` only matters for the
    full-attention case (``W >= L``; rounded up to a multiple of the chunk). ``checkpointing``: also B'MOJO with
    activation checkpointing (``CHECKPOINTED``, right after it); ``selective_recompute``: also B'MOJO recomputing
    its attention and SSD ops (``RECOMPUTED``, after those); both: also B'MOJO with both (``BOTH``: the layers'
    recomputation recomputes the attention and SSD ops block by block, ``sequence_block_size``). ``compile_models``:
    also B'MOJO and Llama wrapped in ``torch.compile`` (``COMPILED``, kind "compiled": trained, never decoded)."""
    base = preset_config(preset, **overrides)
    target = count(BMojoForCausalLM(base))
    chunk = base.chunk_size

    def ours(window=None, **fields):
        cfg = preset_config(preset, **{**overrides, **fields})
        if window is not None:
            cfg.window_size = -(-window // chunk) * chunk
        return BMojoForCausalLM(cfg)

    # Attention cases: attention layers, MLP widened to equal parameters.
    attn = dict(layers_block_type=["attention"] * base.num_hidden_layers)
    width = 64 * round(base.intermediate_size * target / count(ours(**attn)) / 64)
    while count(ours(**attn, intermediate_size=width)) < target:
        width += 64
    attn["intermediate_size"] = width
    # Mamba-2 case: SSM layers without MLP (Mamba-2's own block), deep enough for equal parameters.
    depth = 1
    while count(ours(num_hidden_layers=depth + 1, layers_block_type=["ssm"] * (depth + 1), use_mlp=False)) <= target:
        depth += 1
    ssm = dict(num_hidden_layers=depth, layers_block_type=["ssm"] * depth, use_mlp=False)
    full_window = max_length + 64

    def llama(window=None):
        from transformers import LlamaForCausalLM

        return LlamaForCausalLM(llama_config(ours(**attn).config, max_length + 64))

    def mistral(window=None):
        from transformers import MistralConfig, MistralForCausalLM

        cfg = llama_config(ours(**attn).config, max_length + 64).to_dict()
        keep = set(MistralConfig().to_dict()) - {"architectures", "model_type", "transformers_version"}
        mcfg = MistralConfig(**{k: v for k, v in cfg.items() if k in keep})
        mcfg.sliding_window = base.window_size
        return MistralForCausalLM(mcfg)

    def mamba2(window=None):
        from transformers import Mamba2ForCausalLM

        return Mamba2ForCausalLM(mamba2_config(ours(**ssm).config))

    def checkpointed(window=None):
        model = ours()
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
        return model

    def recomputed(window=None):
        model = ours()
        model.selective_recompute_enable()
        return model

    def both(window=None):
        model = checkpointed()
        model.selective_recompute_enable()
        return model

    full = lambda window=None: ours(window or full_window, **attn)
    extra = {CHECKPOINTED: (checkpointed, "ours", ours().config)} if checkpointing else {}
    if selective_recompute:
        extra[RECOMPUTED] = (recomputed, "ours", ours().config)
    if checkpointing and selective_recompute:
        extra[BOTH] = (both, "ours", ours().config)
    specs = {
        REF: (lambda window=None: ours(), "ours", ours().config),
        **extra,
        "B'MOJO SWA case": (lambda window=None: ours(**attn), "ours", ours(**attn).config),
        "B'MOJO full-attention case": (full, "ours", full().config),
        "B'MOJO Mamba-2 case": (lambda window=None: ours(**ssm), "ours", ours(**ssm).config),
        LLAMA: (llama, "hf_llama", full().config),
        f"transformers Mistral (W={base.window_size})": (mistral, "hf_mistral", ours(**attn).config),
        "transformers Mamba2": (mamba2, "hf_mamba2", ours(**ssm).config),
    }
    if compile_models:
        for name, compiled_name in COMPILED.items():
            factory, _, config = specs[name]
            # dynamic=False: one graph per training length, each compiled in its warm-up step
            compiled = lambda window=None, f=factory: torch.compile(f(), dynamic=False)
            specs[compiled_name] = (compiled, "compiled", config)
    return specs


def skipped(specs: dict, keys) -> dict:
    """``specs`` without the models named by ``keys`` (``SKIPPABLE``)."""
    return {n: spec for n, spec in specs.items() if not any(n.startswith(SKIPPABLE[k]) for k in keys)}


def describe(model) -> str:
    """One line with what decides a model's cost."""
    c = model.config
    if hasattr(c, "layers_block_type"):
        kinds = set(c.layers_block_type)
        text = f"layers={c.num_hidden_layers}x{','.join(sorted(kinds))} d={c.hidden_size} "
        text += f"mlp={c.intermediate_size if c.use_mlp else 0} seq_block={getattr(c, 'sequence_block_size', None)} "
        if kinds & {"attention", "bmojo"}:
            text += f"heads={c.num_attention_heads}/{c.num_key_value_heads} W={c.window_size} C={c.chunk_size} "
        if "bmojo" in kinds:
            text += f"fading={c.use_fading} M={c.memory_size} "
            # the issue-11 options that change the work (V0_OPTIONS: the original design)
            changed = [f"{k}={getattr(c, k)}" for k, v in V0_OPTIONS.items() if getattr(c, k) != v]
            text += f"options={'v0' if not changed else ','.join(changed)} "
        if kinds & {"ssm", "bmojo"}:
            chunk = getattr(c, "ssd_chunk_size", None) or c.chunk_size
            text += f"ssd_C={chunk} N={c.ssm_state_size} P={c.ssm_head_dim} ssm_heads={c.ssm_num_heads} "
        # how the backward gets what it needs: what the model was built with, read from the model itself
        checkpointed = sum(bool(getattr(b, "gradient_checkpointing", False)) for b in model.model.layers)
        recomputed = sorted(set().union(*(getattr(m, "recompute_ops", ()) for m in model.modules())))
        if checkpointed:
            text += f"checkpointed_layers={checkpointed} "
        if recomputed:
            text += f"recompute={','.join(recomputed)}"
        return text.strip()
    fields = ["num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
              "sliding_window", "state_size", "head_dim", "num_heads", "n_groups", "chunk_size"]  # fmt: skip
    return f"{type(model).__name__}: " + " ".join(f"{f}={getattr(c, f)}" for f in fields if hasattr(c, f))


def ideal_train_flops(config, length: int, recompute: bool = False, recompute_ops: bool = False) -> float:
    """FLOPs per token of one training step (3x the forward; ``recompute``: plus the layers' forward once more, as
    activation checkpointing does; ``recompute_ops``: plus the attention and SSD ops' forward once more, as selective
    recompute does) of an exact algorithm for ``config``'s model at
    length ``L``: 2 per weight (every 2-D projection and the tied output layer), attention 4·H·D per visible key
    (averaged over the positions; a causal Transformer sees (L+1)/2 keys on average, a window min(i+1, W), B'MOJO
    also the W fading keys once past W and M eidetic slots), SSD with chunk l: G·N·l + H·P·l (in-chunk scores and
    their application, half of l on average, 2 FLOPs each) + 4·H·P·N (state update and read-out)."""
    with torch.device("meta"):
        model = BMojoForCausalLM(config)
    embed = model.model.embed_tokens.weight
    dense = sum(p.numel() for p in model.parameters() if p.dim() == 2 and p is not embed) + embed.numel()
    pos = torch.arange(length, dtype=torch.float64)
    window = torch.clamp(pos + 1, max=config.window_size).mean().item()
    fading = torch.clamp(pos + 1 - config.window_size, min=0, max=config.window_size).mean().item()
    head = config.num_attention_heads * config.head_dim
    chunk = getattr(config, "ssd_chunk_size", None) or config.chunk_size
    ssd = (
        config.ssm_ngroups * config.ssm_state_size * chunk
        + config.ssm_num_heads * config.ssm_head_dim * chunk
        + 4 * config.ssm_num_heads * config.ssm_head_dim * config.ssm_state_size
    )
    mixing = 0.0
    for kind in config.layers_block_type:
        if kind == "attention":
            mixing += 4 * head * window
        elif kind == "ssm":
            mixing += ssd
        else:
            keys = (
                window
                + (fading if config.use_fading else 0)
                + (config.memory_size if length > config.window_size else 0)
            )
            mixing += 4 * head * keys + ssd
    layers_forward = 2 * (dense - embed.numel()) + mixing  # all but the (tied) embedding / output layer
    return 3 * (2 * dense + mixing) + (layers_forward if recompute else 0) + (mixing if recompute_ops else 0)


def activation_bytes(model, x) -> int:
    """Bytes autograd saves for the backward of one training forward (each storage once, parameters excluded).

    With activation checkpointing: what the layers keep, i.e. each layer's input (torch's checkpoint saves it
    through the same hooks) plus what the rest of the model saves; the sequence info the layers share and hold
    without saving it (positions, rotary angles, token ids: less than one [B, L, d] in all) is not counted."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and storage.device.type != "meta":
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=x, labels=x).loss
    del loss
    release_memory()
    return sum(seen.values())


def release_memory() -> None:
    """Give freed memory back to the OS (glibc keeps freed mid-sized blocks, and the resident size of a process
    that runs seven models at 8K would grow to the sum of their peaks)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


# glibc's mmap threshold for the peak-memory children: every allocation from 128 KiB up is mapped on its own and
# unmapped when freed, so the resident peak follows the live tensors. Left to itself, glibc raises the threshold
# after freeing a mapped block and then keeps such blocks in its heap: the resident peak then depends on the order of
# past allocations (transformers' Llama at the cpu preset, 8K: 1,187-1,507 MiB across runs, against 1,091-1,101 every
# time with a fixed threshold).
PEAK_MMAP_THRESHOLD = 128 * 1024
M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


def fix_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold at ``PEAK_MMAP_THRESHOLD`` (``mallopt``); False where there is no glibc."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, PEAK_MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


def _status_bytes(field: str) -> int:
    """A ``/proc/self/status`` size field (``VmRSS``, ``VmHWM``) in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_step_child(preset: str, overrides: dict, max_length: int, checkpointing: bool, name: str, length: int,
                    batch: int, vocab: int, selective_recompute: bool = False) -> tuple[int, int]:  # fmt: skip
    """In a fresh process: ``(peak, activations)``. ``peak``: the peak resident memory of ``name``'s first training
    step (forward, backward, AdamW step: activations, gradients, optimizer state, temporaries) above the resident
    size just before it (weights, the interpreter); Linux: ``/proc/self/clear_refs`` resets the peak (``VmHWM``) to
    the current size; glibc's mmap threshold is fixed first (``fix_mmap_threshold``), so the peak is the live
    memory's, not what the allocator happened to keep. ``activations``: ``activation_bytes`` of the same model and
    input, measured after the step (so that no model's graph ever shares a process with another's: at 8K they do not
    fit in 24 GiB together)."""
    fix_mmap_threshold()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_specs(preset, overrides, max_length, checkpointing, selective_recompute)[name][0]()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(3, vocab, (batch, length))
    release_memory()
    before = _status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    train_step(model, opt, x)
    peak = _status_bytes("VmHWM") - before
    return peak, activation_bytes(model, x)


def run_child(argv: list[str], what: str) -> str:
    """Run ``argv`` and return its stdout; ``RuntimeError("<what> failed: <why>")`` if it fails, ``why`` being the
    last line of its stderr or, for a process killed by a signal (the kernel's out-of-memory killer sends SIGKILL),
    the signal's name."""
    import signal
    import subprocess

    out = subprocess.run(argv, capture_output=True, text=True, check=False)
    if out.returncode < 0:
        sig = signal.Signals(-out.returncode).name
        why = f"killed by {sig}" + (" (out of memory?)" if sig == "SIGKILL" else "")
        raise RuntimeError(f"{what} failed: {why}")
    if out.returncode:
        last = out.stderr.strip().splitlines()[-1:] or [f"exit status {out.returncode}"]
        raise RuntimeError(f"{what} failed: {last[0]}")
    return out.stdout


def peak_step_bytes(args, overrides: dict, name: str, length: int, vocab: int) -> tuple[int, int]:
    """``peak_step_child`` run in a subprocess (one model per process: a process's peak is its own)."""
    job = dict(
        preset=args.preset, overrides=overrides, max_length=max(args.train_lengths + args.contexts), name=name,
        checkpointing=args.checkpointing, length=length, batch=args.train_batch, vocab=vocab,
        selective_recompute=getattr(args, "selective_recompute", False),
    )  # fmt: skip
    stdout = run_child(
        [sys.executable, __file__, "--peak-child", json.dumps(job)], f"peak memory of {name} at L={length}"
    )
    peak, activations = json.loads(stdout.strip().splitlines()[-1])
    return peak, activations


def train_step(model, opt, x) -> None:
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    release_memory()


def train_tokens_per_s(models, length, batch, rounds, vocab, warm_at_length=()):
    """Median training tokens/s per model over ``rounds`` interleaved rounds at [batch, length]. Each model takes
    one untimed warm-up step first (allocator, first calls): at [1, 256], or at [batch, length] for the names in
    ``warm_at_length`` (compiled models: their graph for this shape is compiled there)."""
    opts = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in models.items()}
    for name, model in models.items():
        shape = (batch, length) if name in warm_at_length else (1, 256)
        train_step(model, opts[name], torch.randint(3, vocab, shape, generator=torch.Generator().manual_seed(0)))
    times = {name: [] for name in models}
    for r in range(rounds):
        x = torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(r + 1))
        for name, model in models.items():
            start = time.perf_counter()
            train_step(model, opts[name], x)
            times[name].append(time.perf_counter() - start)
    return {name: batch * length / statistics.median(t) for name, t in times.items()}


def state_bytes(obj, seen=None) -> int:
    """Bytes of every tensor reachable from a cache object (works across transformers versions)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(state_bytes(o, seen) for o in obj)
    if isinstance(obj, dict):
        return sum(state_bytes(o, seen) for o in obj.values())
    if hasattr(obj, "__dict__") and not isinstance(obj, (torch.nn.Module, type)):
        return sum(state_bytes(o, seen) for k, o in vars(obj).items() if k != "config")
    return 0


@torch.no_grad()
def decoder(factory, kind, context, steps, vocab):
    """(one-token step function, its cache, the token) for a model whose state holds ``context`` tokens."""
    model = factory(window=context + steps + 1).eval()
    token = torch.randint(3, vocab, (1, 1))
    if kind == "ours":
        cache = BMojoCache.empty(model.config, 1)
        cache.positions.fill_(context)
        run = lambda t: model(input_ids=t, cache=cache)
    elif kind in ("hf_llama", "hf_mistral"):
        from transformers import DynamicCache

        c = model.config
        cache = DynamicCache(config=c)
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        gen = torch.Generator().manual_seed(context)
        for layer in range(c.num_hidden_layers):
            k, v = (torch.randn(1, c.num_key_value_heads, context, head_dim, generator=gen) for _ in range(2))
            cache.update(k, v, layer)
        position = [context]

        def run(t):
            p = torch.tensor([position[0]])
            result = model(input_ids=t, past_key_values=cache, use_cache=True, cache_position=p, position_ids=p[None])
            position[0] += 1
            return result
    else:
        out = model(input_ids=torch.randint(3, vocab, (1, 64)), use_cache=True)
        cache = out.cache_params  # transformers Mamba2 (5.2x: an alias of .cache)
        position = [64]

        def run(t):
            result = model(input_ids=t, cache_params=cache, use_cache=True, cache_position=torch.tensor([position[0]]))
            position[0] += 1
            return result

    run(token)  # warm-up
    return run, cache, token


@torch.no_grad()
def decode_ms_per_token(specs, context, steps, rounds, vocab):
    """Median ms/token of each model over ``rounds`` rounds of ``steps`` tokens (rounds interleave the models), and
    the bytes of each model's decoding state."""
    setups = {
        name: decoder(factory, kind, context, steps * rounds, vocab) for name, (factory, kind, _) in specs.items()
    }
    times = {name: [] for name in specs}
    for _ in range(rounds):
        for name, (run, _, token) in setups.items():
            start = time.perf_counter()
            for _ in range(steps):
                run(token)
            times[name].append(1000 * (time.perf_counter() - start) / steps)
    return {name: statistics.median(t) for name, t in times.items()}, {
        n: state_bytes(c) for n, (_, c, _) in setups.items()
    }


def without_note(argv: list[str]) -> list[str]:
    """The arguments without ``--note`` and its text (the command line gets ``--note TEXT`` at its end, unquoted;
    the note is printed on its own)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--note":
            skip = True
        elif not arg.startswith("--note="):
            out.append(arg)
    return out


positive_int = _int_at_least(1)  # argparse type: an integer >= 1


def _block_size(text: str):
    """``--sequence-block-size``: a positive integer or ``"none"`` (kept as the word: ``None`` means not given)."""
    if text == "none":
        return text
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or none, got {text!r}") from None


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu", help="model shape (default: cpu)")
    parser.add_argument(
        "--layers", type=positive_int, default=None, help="override the preset's depth (a scaled-down shape)"
    )
    parser.add_argument("--vocab-size", type=positive_int, default=None, help="override the preset's vocabulary")
    parser.add_argument(
        "--sequence-block-size",
        type=_block_size,
        default=None,
        metavar="N|none",
        help="override our models' sequence_block_size (tokens per call of the attention and SSD ops; none: the "
        "whole sequence in one call); default: the configuration's",
    )
    parser.add_argument("--train-lengths", type=positive_int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--contexts", type=positive_int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--train-batch", type=positive_int, default=1)
    parser.add_argument("--rounds", type=positive_int, default=3)
    parser.add_argument("--decode-steps", type=positive_int, default=16)
    parser.add_argument(
        "--threads", type=positive_int, nargs="+", default=[1, 2], help="torch thread counts to measure"
    )
    parser.add_argument(
        "--later-lengths",
        type=positive_int,
        nargs="+",
        default=None,
        help="training lengths for the thread counts after the first (default: --train-lengths)",
    )
    parser.add_argument("--out", default="docs", help="where throughput.{md,json,png} go")
    parser.add_argument("--quick", action="store_true", help="2 training rounds, 3 decode rounds of 8 tokens")
    parser.add_argument(
        "--checkpointing",
        action="store_true",
        help=f"also measure {CHECKPOINTED!r} (training tokens/s and activation memory)",
    )
    parser.add_argument(
        "--selective-recompute",
        action="store_true",
        help=f"also measure {RECOMPUTED!r} (training tokens/s and activation memory); with --checkpointing also "
        f"{BOTH!r}",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help=f"also measure {COMPILED[REF]!r} and {COMPILED[LLAMA]!r} (training tokens/s only; each compiles in an "
        "untimed warm-up step per training length and thread count, ~6 min for the cpu preset's B'MOJO)",
    )
    parser.add_argument(
        "--skip",
        nargs="+",
        default=[],
        choices=sorted(SKIPPABLE),
        help="leave these models out (e.g. full: B'MOJO's full-attention case keeps an L x (L + C) score matrix per "
        "head and layer for the backward, ~12 GiB at L=8K with the cpu preset)",
    )
    parser.add_argument(
        "--peak-memory",
        action="store_true",
        help="also measure each model's peak resident memory of a training step at each L (one process per model "
        "and length; Linux)",
    )
    parser.add_argument(
        "--report-only",
        metavar="JSON",
        default=None,
        help="measure nothing: rewrite the report (md, png) next to a throughput.json or throughput.partial.json",
    )
    parser.add_argument("--peak-child", default=None, help=argparse.SUPPRESS)  # internal: one peak_step_child job
    parser.add_argument("--note", default="", help="a line about the machine, copied into the report")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.decode_steps = 2, 8
    if Path(args.out).exists() and not Path(args.out).is_dir():
        parser.error(f"--out: {args.out} is a file, not a folder")
    if args.report_only:
        args.report = read_results(args.report_only, parser.error)
    return args


REPORT_KEYS = ("command", "preset", "parameters", "activation_bytes", "train_tokens_per_s", "decode_ms_per_token")


def read_results(path: str, error) -> dict:
    """A throughput JSON (finished or partial) for ``--report-only``; ``error(message)`` (argparse's: one line, exit
    status 2) if the file is missing, not JSON, or not this benchmark's results."""
    source = Path(path)
    if not source.is_file():
        error(f"--report-only: no such file: {path}")
    try:
        results = json.loads(source.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        error(f"--report-only: {path} is not JSON ({err})")
    missing = [key for key in REPORT_KEYS if not isinstance(results, dict) or key not in results]
    if missing:
        error(f"--report-only: {path} is not a bench_throughput.py result (no {', '.join(missing)})")
    return results


def main() -> None:
    args = parse_args()
    if args.peak_child:
        print(json.dumps(peak_step_child(**json.loads(args.peak_child))))
        return
    if args.report_only:  # a partial run's report goes next to, never over, a finished one's
        source = Path(args.report_only)
        write_report(args.report, source.parent, source.name.removesuffix(".json"))
        return
    overrides = {k: v for k, v in (("num_hidden_layers", args.layers), ("vocab_size", args.vocab_size)) if v}
    if args.layers:
        overrides["layers_block_type"] = [preset_config(args.preset).layers_block_type[0]] * args.layers
    if args.sequence_block_size is not None:
        overrides["sequence_block_size"] = None if args.sequence_block_size == "none" else args.sequence_block_size
    torch.manual_seed(0)
    specs = build_specs(
        args.preset,
        overrides,
        max(args.train_lengths + args.contexts),
        args.checkpointing,
        args.selective_recompute,
        args.compile,
    )
    specs = skipped(specs, args.skip)
    compiled = {name for name, (_, kind, _) in specs.items() if kind == "compiled"}
    vocab = preset_config(args.preset, **overrides).vocab_size
    models = {name: factory() for name, (factory, _, _) in specs.items()}
    params = {name: count(m) for name, m in models.items()}
    configs = {name: describe(getattr(m, "_orig_mod", m)) for name, m in models.items()}  # compiled: the model inside
    for name in models:
        print(f"{name:34s} {params[name] / 1e6:6.2f}M  {configs[name]}")
    flops = {
        n: {L: ideal_train_flops(cfg, L, recompute=n in (CHECKPOINTED, BOTH), recompute_ops=n in (RECOMPUTED, BOTH))
            for L in args.train_lengths}
        for n, (_, _, cfg) in specs.items()
    }
    results = {
        "command": " ".join(["python scripts/bench_throughput.py", *map(shlex.quote, without_note(sys.argv[1:]))])
        + (" --note TEXT" if args.note else ""),
        "note": args.note,
        "versions": {"torch": torch.__version__, "transformers": _transformers_version()},
        "preset": args.preset,
        "overrides": overrides,
        "parameters": params,
        "configs": configs,
        "ideal_train_flops_per_token": flops,
        "train_batch": args.train_batch,
        "activation_bytes": {n: {} for n in models},
        "peak_step_bytes": {n: {} for n in models} if args.peak_memory else {},
        "train_tokens_per_s": {},
        "decode_ms_per_token": {},
        "state_bytes": {n: {} for n in models},
        "failures": [],
    }
    out = Path(args.out)
    for L in args.train_lengths:
        x = torch.randint(3, vocab, (args.train_batch, L))
        for name, model in models.items():
            if name in compiled:  # trained only
                results["activation_bytes"][name][L] = None
                if args.peak_memory:
                    results["peak_step_bytes"][name][L] = None
            elif args.peak_memory:  # both in a child process per model; a child that fails is recorded, not fatal
                try:
                    peak, saved = peak_step_bytes(args, overrides, name, L, vocab)
                except RuntimeError as err:
                    print(err)
                    results["failures"].append(str(err))
                    peak = saved = None
                results["activation_bytes"][name][L], results["peak_step_bytes"][name][L] = saved, peak
            else:
                results["activation_bytes"][name][L] = activation_bytes(model, x)
            save_partial(results, out)
        print(f"L={L:6d} activations: " + ", ".join(f"{n} {mib(b[L])}" for n, b in results["activation_bytes"].items()))
        if args.peak_memory:
            peaks = results["peak_step_bytes"].items()
            print(f"L={L:6d} peak step memory: " + ", ".join(f"{n} {mib(b[L])}" for n, b in peaks))
    for threads in args.threads:
        torch.set_num_threads(threads)
        if compiled:  # inductor's kernels keep the thread count they were generated for (part of its cache key)
            torch._inductor.config.cpp.threads = threads
        train = results["train_tokens_per_s"][threads] = {n: {} for n in models}
        lengths = args.train_lengths if threads == args.threads[0] else (args.later_lengths or args.train_lengths)
        for L in lengths:
            if compiled:  # one graph per length (dynamic=False): no cache of graphs to outgrow its recompile limit
                torch._dynamo.reset()
            # with compiled models, every model warms up at the measured shape (the compiled ones compile there)
            tps = train_tokens_per_s(models, L, args.train_batch, args.rounds, vocab, set(models) if compiled else ())
            for name in models:
                train[name][L] = tps[name]
                ideal = flops[name][L] / flops[REF][L]
                print(f"threads {threads} L={L:6d} {name:34s} {tps[name]:8.0f} tokens/s  "
                      f"B'MOJO/this {tps[REF] / tps[name]:.2f}x (ideal {ideal:.2f}x)")  # fmt: skip
            save_partial(results, out)
        # decoding never checkpoints nor recomputes: those models decode as B'MOJO does
        decoders = {n: spec for n, spec in specs.items() if n not in (CHECKPOINTED, RECOMPUTED, BOTH, *compiled)}
        decode = results["decode_ms_per_token"][threads] = {n: {} for n in decoders}
        for context in args.contexts:
            ms, size = decode_ms_per_token(decoders, context, args.decode_steps, 3, vocab)
            for name in decoders:
                decode[name][context], results["state_bytes"][name][context] = ms[name], size[name]
                print(f"threads {threads} context {context:6d} {name:34s} {ms[name]:8.2f} ms/token  "
                      f"{size[name] / 2**20:8.2f} MiB state")  # fmt: skip
            save_partial(results, out)
    results["targets"] = targets(results)
    for line in results["targets"]:
        print(line)
    write_report(results, out)
    (out / PARTIAL).unlink(missing_ok=True)


PARTIAL = "throughput.partial.json"


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def save_partial(results, out: Path) -> None:
    """Everything measured so far, to ``out/throughput.partial.json``, replaced atomically after every measurement:
    a crash, an out-of-memory kill or Ctrl-C loses only the measurement in flight. ``--report-only`` renders it
    (cells not measured show as "-"); a finished run removes it."""
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / PARTIAL, json.dumps(results, indent=2))


def mib(nbytes) -> str:
    """``nbytes`` in MiB, or "-" for a measurement that is missing or failed."""
    return "-" if nbytes is None else f"{nbytes / 2**20:.0f} MiB"


def cell(table: dict, name: str, key):
    """``table[name][key]`` whether the keys are ints (a run) or strings (its JSON); None if missing or failed."""
    row = table.get(name) or {}
    return row.get(key, row.get(str(key)))


def ratio(table: dict, name: str, other: str, key):
    """``table[name][key] / table[other][key]``, None unless both were measured."""
    a, b = cell(table, name, key), cell(table, other, key)
    return None if a is None or b is None else a / b


def targets(results) -> list[str]:
    """The issue's targets, each with the measured ratio and met / missed ("not measured" where a value is missing:
    a failed or unfinished run)."""
    lines = []
    llama, mamba2, swa = LLAMA, "transformers Mamba2", "B'MOJO SWA case"

    def verdict(label: str, r, goal: str, met: bool) -> None:
        lines.append(f"{label}: not measured (target {goal})" if r is None
                     else f"{label}: {r:.2f}x (target {goal}): {'met' if met else 'missed'}")  # fmt: skip

    for threads, train in results["train_tokens_per_s"].items():
        for L, goal in ((2048, 1.0), (8192, 1.5)):
            if cell(train, REF, L) is not None:
                r = ratio(train, REF, llama, L)
                verdict(f"[{threads} thr] training tokens/s B'MOJO/Llama at L={L}", r, f">= {goal}", r and r >= goal)
            if cell(train, COMPILED[REF], L) is not None:  # --compile: the same target with both compiled
                r = ratio(train, COMPILED[REF], COMPILED[LLAMA], L)
                label = f"[{threads} thr] training tokens/s B'MOJO/Llama at L={L}, both torch.compile"
                verdict(label, r, f">= {goal}", r and r >= goal)
        ratios = [r for r in (ratio(train, REF, swa, L) for L in train.get(REF, {})) if r is not None]
        worst = min(ratios, default=None)
        verdict(f"[{threads} thr] B'MOJO/own SWA case, worst L", worst, ">= 0.9", worst and worst >= 0.9)
    for threads, decode in results["decode_ms_per_token"].items():
        contexts = sorted(decode.get(REF) or {}, key=int)
        if not contexts:
            continue
        ms = [cell(decode, REF, c) for c in contexts]
        spread = max(ms) / min(ms) if len(ms) > 1 else None
        verdict(f"[{threads} thr] B'MOJO decode ms/token max/min over {contexts[0]}..{contexts[-1]}", spread,
                "<= 1.10", spread and spread <= 1.10)  # fmt: skip
        ratios = [ratio(decode, REF, mamba2, c) for c in contexts]
        worst = None if None in ratios else max(ratios)
        verdict(
            f"[{threads} thr] decode ms/token B'MOJO/Mamba2, worst context", worst, "<= 1.5", worst and worst <= 1.5
        )
    act, peak = results["activation_bytes"], results.get("peak_step_bytes") or {}
    lengths = sorted(act.get(REF) or {}, key=int)
    if lengths:
        L = lengths[-1]
        for kind, table in (("activation memory", act), ("peak training-step memory", peak)):
            for name in (REF, CHECKPOINTED, RECOMPUTED, BOTH):
                if name in table:  # peak: the words, "peak training memory"
                    r = ratio(table, name, llama, L)
                    verdict(f"{kind} {name}/Llama at L={L}", r, "<= 1.0", r is not None and r <= 1.0)
    return lines


def size_label(tokens) -> str:
    tokens = int(tokens)
    return f"{tokens // 1024}K" if tokens % 1024 == 0 else str(tokens)


def with_ratio(table: dict, name: str, key) -> str:
    """A memory cell: MiB (ratio to B'MOJO), "-" for what was not measured."""
    value, ratio_to_ref = cell(table, name, key), ratio(table, name, REF, key)
    if value is None:
        return "-"
    return f"{value / 2**20:.0f} ({'-' if ratio_to_ref is None else f'{ratio_to_ref:.2f}×'})"


def write_report(results, out: Path, stem: str = "throughput") -> None:
    """``out/<stem>.{json,md,png}``; a partial run's report goes to ``throughput.partial.*`` (``--report-only``), next
    to, never over, a finished run's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2))
    names = list(results["parameters"])
    flops, act = results["ideal_train_flops_per_token"], results["activation_bytes"]
    lengths = sorted(act[REF], key=int)
    lines = [
        "# Throughput on the CPU: B'MOJO against its special cases and transformers' models",
        "",
        f"Regenerate: `{results['command']}`. {results['note']}"
        + (f" ({', '.join(f'{n} {v}' for n, v in results['versions'].items())})" if results.get("versions") else ""),
        "",
        *(
            [
                "**Partial results of an unfinished run** (from `throughput.partial.json`): `-` marks what was not "
                "measured.",
                "",
            ]
            if "targets" not in results
            else []
        ),  # fmt: skip
        "Absolute numbers depend on the machine; quote the ratios, which are measured side by side in one run (the",
        "models alternate within every round). **B'MOJO/model** > 1 means B'MOJO is that many times faster; the",
        "*ideal* ratio in brackets is the inverse FLOP ratio (`ideal_train_flops`): what the measured ratio would be",
        "if both reached the same FLOP/s.",
        "",
        f"## Models (preset `{results['preset']}` {results['overrides'] or ''})",
        "",
        "| model | parameters | configuration |",
        "|---|---|---|",
    ]
    lines += [f"| {n} | {results['parameters'][n] / 1e6:.2f}M | `{results['configs'][n]}` |" for n in names]
    for threads, train in results["train_tokens_per_s"].items():
        lines += [
            "",
            f"## Training, {threads} thread(s), batch {results['train_batch']}: tokens/s and B'MOJO/model (ideal)",
            "",
        ]
        tl = sorted(train[REF], key=int)
        lines += ["| model | " + " | ".join(f"L={size_label(L)}" for L in tl) + " |", "|---" * (1 + len(tl)) + "|"]
        for n in names:
            cells = [
                "-" if cell(train, n, L) is None else
                f"{cell(train, n, L):.0f} · {ratio(train, REF, n, L):.2f}× ({ratio(flops, n, REF, L):.2f}×)"
                for L in tl
            ]  # fmt: skip
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", "## Activation memory of a training step (MiB saved for the backward; ratio to B'MOJO)", ""]
    lines += [
        "| model | " + " | ".join(f"L={size_label(L)}" for L in lengths) + " |",
        "|---" * (1 + len(lengths)) + "|",
    ]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(with_ratio(act, n, L) for L in lengths) + " |")
    peak = results.get("peak_step_bytes") or {}
    if peak:
        lines += ["", "## Peak memory of a training step (MiB resident above the weights, one process per model; "
                  "ratio to B'MOJO)", ""]  # fmt: skip
        lines += ["| model | " + " | ".join(f"L={size_label(L)}" for L in lengths) + " |",
                  "|---" * (1 + len(lengths)) + "|"]  # fmt: skip
        for n in names:
            lines.append(f"| {n} | " + " | ".join(with_ratio(peak, n, L) for L in lengths) + " |")
    for threads, decode in results["decode_ms_per_token"].items():
        contexts = sorted(decode[REF], key=int)
        lines += ["", f"## Decoding, {threads} thread(s): ms/token after a context of t tokens (state MiB)", ""]
        lines += [
            "| model | " + " | ".join(f"t={size_label(c)}" for c in contexts) + " |",
            "|---" * (1 + len(contexts)) + "|",
        ]
        for n in [n for n in names if n in decode]:
            size = results["state_bytes"][n]
            lines.append(f"| {n} | " + " | ".join(
                "-" if cell(decode, n, c) is None else f"{cell(decode, n, c):.2f} ({size[c] / 2**20:.1f})"
                for c in contexts) + " |")  # fmt: skip
    lines += ["", "## Targets (issue 12)", ""] + [f"* {t}" for t in results.get("targets") or targets(results)]
    if results.get("failures"):
        lines += ["", "## Failed measurements", ""] + [f"* {f}" for f in results["failures"]]
    (out / f"{stem}.md").write_text("\n".join(lines) + f"\n\n![throughput]({stem}.png)\n")

    threads = next(iter(results["train_tokens_per_s"]), None)  # None: a partial run that measured memory only
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    train, decode = results["train_tokens_per_s"].get(threads, {}), results["decode_ms_per_token"].get(threads, {})

    def plot(ax, table, n, keys, scale=1.0):  # the measured points only (missing or failed: left out)
        kv = [(int(k), cell(table, n, k)) for k in keys]
        kv = [(k, v / scale) for k, v in kv if v is not None]
        if kv:
            ax.plot([k for k, _ in kv], [v for _, v in kv], marker="o", label=n)

    for n in names:
        plot(axes[0], train, n, sorted(train.get(REF) or {}, key=int))
        plot(axes[1], act, n, lengths, 2**20)
        plot(axes[2], decode, n, sorted(decode.get(n) or {}, key=int))
    per_thread = "" if threads is None else f" ({threads} thread)"
    titles = [f"training tokens/s{per_thread}", "activation memory (MiB)", f"decode ms/token{per_thread}"]
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        if not ax.has_data():  # a partial run: nothing measured here yet (a log scale needs data)
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence / context length")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png", dpi=110)
    print(f"wrote {out / stem}.md, {out / stem}.json, {out / stem}.png")


if __name__ == "__main__":
    main()
