"""Answer visibility: for each recall query, can the attention of each layer see the queried pair at all?

A query at position ``i`` (a label that is not ``IGNORE_INDEX``; the input there is the key, the label its value)
can be answered by a B'MOJO layer's attention only if the pair it asks for, the key token at ``p`` and the value
token at ``p + 1`` (the earliest ``p`` with ``inputs[p] == inputs[i]`` and ``inputs[p + 1] == labels[i]``), is

* ``window``: in the sliding window. The attention's window of query ``i`` is ``[i - W + 1, i]`` (``W`` keys,
  the query itself included: ``ops/attention/naive.py``); the class asks for the value token there (the key, one
  before it, may just have left);
* ``memory``: otherwise, held in the eidetic memory *visible* to query ``i``: a valid slot of the memory that query
  ``i``'s chunk sees (``memory[:, i // C]``, after the admission rule of the config: ``"chunk"`` or
  ``"window_exit"``) with ``pos <= i - W`` (and ``pos >= doc_start[i]`` with ``memory_reset_at_document``); the
  key or the value counts (``key_in_memory`` and ``value_in_memory`` tell which);
* ``neither``: only the SSM state can carry it (through the fading tokens of ``[i - 2W + 1, i - W]``, whose span
  ``value_in_fading_span`` counts, or the self fading key).

The memory is read from the model's own forward: ``captured_attention`` wraps each attention mixer's ``_attend``
for the duration of one forward and records the ``EideticMemory`` the attention op receives (no selection is
recomputed here). ``tests/test_coverage.py`` checks those positions against the decoding cache's.

The slot census says what the memory holds at the queries: each of the ``M`` slots of the memory a query sees is
``empty``, ``not_visible`` (held but inside the window, or from an earlier document), or holds a ``pair_key``,
a ``pair_value`` (of any pair of the example; ``queried_pair`` counts those of the query's own pair), a ``query``
token (a later occurrence of a key, at a labelled position) or ``other`` (filler). ``pair_share_visible`` is the
pair tokens' share of the visible held slots; ``pair_share_chance`` is their share of the positions a visible slot
could hold (``j <= i - W``): what a selection blind to content would keep.

    python -m bmojo.evals.coverage --study mqar --variants bmojo_new bmojo_new_random bmojo_new_recency \\
        --seed 0 --lr-from /work/studies/mqar/summary.json --out docs/eidetic/coverage

trains each variant exactly as ``bmojo.evals.ablation`` does (its config matching and ``train_recall``), then
measures visibility and accuracy on the study's test split at ``--pairs`` (default 2, 8, 16). Nothing finished is
lost on a kill: ``coverage.json`` is rewritten after every variant, and an invocation reuses each variant that the
``coverage.json`` in its ``--out`` already holds at the same settings, lr, seed and test sets (delete the file to
compute again); a variant in training saves its state every 2 minutes into
``OUT/.<variant>_lr=<lr>_seed=<seed>.partial/`` and continues from there (``bmojo.evals.ablation.RunCheckpoints``).
Ctrl-C stops it with one line saying what is kept, and exit status 130.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

import torch

from ..checkpoint import write_text_atomic
from ..errors import BMojoError
from ..layers.attention import SlidingWindowAttention
from .mqar import IGNORE_INDEX
from .recall import RecallBatch

CLASSES = ("window", "memory", "neither")
SLOTS = ("empty", "not_visible", "pair_key", "pair_value", "query", "other")
_KEY, _VALUE, _QUERY = 1, 2, 3  # position roles (0: other)


@contextmanager
def captured_attention(model):
    """Within the block, every forward of ``model`` (a ``BMojoForCausalLM``) records, per attention-bearing layer
    index, what its attention op received: ``{"memory": EideticMemory or None, "doc_start": [B', L] or None,
    "window": W, "chunk": C}``. ``memory.pos/score`` are ``[B', nC, M]`` with ``B' = B`` (or ``B * Hkv`` rows,
    row ``b * Hkv + a`` being head ``a``, with ``memory_per_kv_head``). Yields the (live) dict of records."""
    records: dict[int, dict] = {}
    mixers = [
        (i, block.mixer)
        for i, block in enumerate(model.model.layers)
        if isinstance(block.mixer, SlidingWindowAttention)
    ]

    def wrap(idx, mixer):
        original = mixer._attend  # the bound method; the wrapper shadows it on the instance only

        def _attend(q_rot, k_rot, v, info, k_fade=None, v_fade=None, q_eid=None, memory=None, **options):
            records[idx] = dict(
                memory=memory, doc_start=options.get("doc_start"), window=mixer.window, chunk=mixer.chunk_size
            )
            return original(q_rot, k_rot, v, info, k_fade, v_fade, q_eid, memory, **options)

        return _attend

    for idx, mixer in mixers:
        mixer._attend = wrap(idx, mixer)
    try:
        yield records
    finally:
        for _, mixer in mixers:
            mixer.__dict__.pop("_attend", None)


def pair_positions(inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(query [N, L] bool, key_pos [N, L] long)``: the labelled positions, and for each the position ``p`` of the
    pair it asks for (the earliest ``p < i - 1`` with ``inputs[p] == inputs[i]``, ``inputs[p + 1] == labels[i]``;
    -1 elsewhere). Raises ValueError when a query has no such pair (not a recall batch)."""
    n, length = inputs.shape
    query = labels != IGNORE_INDEX
    i = torch.arange(length)[:, None]
    p = torch.arange(length)[None, :]
    nxt = torch.cat([inputs[:, 1:], torch.full((n, 1), -1, dtype=inputs.dtype)], dim=1)  # inputs[p + 1]
    match = (
        (inputs[:, None, :] == inputs[:, :, None]) & (nxt[:, None, :] == labels[:, :, None]) & (p + 1 < i)[None]
    )  # [N, i, p]
    found = match.any(-1)
    if bool((query & ~found).any()):
        b, q = (query & ~found).nonzero()[0].tolist()
        raise ValueError(f"query at row {b}, position {q} has no earlier key-value pair with its key and label")
    key_pos = torch.where(query, match.float().argmax(-1), -1)  # argmax: the first True
    return query, key_pos


def _roles(query: torch.Tensor, key_pos: torch.Tensor) -> torch.Tensor:
    """``[N, L]`` long: ``_KEY``/``_VALUE`` at every queried pair's tokens, ``_QUERY`` at labelled positions, 0."""
    n, length = query.shape
    roles = torch.zeros(n, length + 1, dtype=torch.long)
    roles[:, :length][query] = _QUERY
    rows = torch.arange(n)[:, None].expand(-1, length)[query]
    roles[rows, key_pos[query]] = _KEY
    roles[rows, key_pos[query] + 1] = _VALUE
    return roles[:, :length]


def _memory_seen(record: dict, n: int, length: int):
    """The memory each query sees, ``(pos, valid) [N, L, S]`` (``S = M``, or ``Hkv * M`` per head), and its
    ``doc_start [N, L]`` (or None); ``None`` without a memory."""
    memory = record["memory"]
    if memory is None:
        return None
    pos, valid = memory.pos, memory.valid  # [B', nC, M]
    heads = pos.shape[0] // n
    chunk = torch.arange(length) // record["chunk"]
    pos, valid = pos[:, chunk], valid[:, chunk]  # [B', L, M]
    if heads > 1:  # rows b * Hkv + a -> the slots of every head of row b
        pos = pos.view(n, heads, length, -1).movedim(1, 2).flatten(2)
        valid = valid.view(n, heads, length, -1).movedim(1, 2).flatten(2)
    doc = record["doc_start"]
    doc = None if doc is None else doc.view(n, heads, length)[:, 0]
    return pos, valid, doc


@torch.no_grad()
def _per_query(model, inputs: torch.Tensor, labels: torch.Tensor) -> dict:
    """Per-query tensors of one sub-batch (see ``answer_visibility``)."""
    n, length = inputs.shape
    query, key_pos = pair_positions(inputs, labels)
    roles = _roles(query, key_pos)
    with captured_attention(model) as records:
        logits = model(input_ids=inputs).logits
    correct = (logits.argmax(-1) == labels) & query
    i = torch.arange(length)[None, :]
    value_pos = key_pos + 1
    layers = {}
    for idx, record in sorted(records.items()):
        w = record["window"]
        out = dict(
            key_in_window=query & (key_pos > i - w),
            value_in_window=query & (value_pos > i - w),
            value_in_fading_span=query & (value_pos <= i - w) & (value_pos > i - 2 * w),
        )
        # positions j <= i - W: what a visible slot can hold; the pair tokens' share of them
        eligible = torch.arange(length)[None, None, :] <= (i - w)[..., None]  # [1, L, L]
        pair_tok = (roles == _KEY) | (roles == _VALUE)
        n_eligible = eligible.sum(-1).expand(n, -1)
        n_pair = (eligible & pair_tok[:, None, :]).sum(-1)
        out["eligible"], out["eligible_pair"] = n_eligible, n_pair
        seen = _memory_seen(record, n, length)
        if seen is None:
            out["key_in_memory"] = out["value_in_memory"] = torch.zeros_like(query)
            out["slots"] = torch.zeros(n, length, len(SLOTS), dtype=torch.long)
            out["queried_pair_slots"] = torch.zeros(n, length, dtype=torch.long)
        else:
            pos, valid, doc = seen
            visible = valid & (pos <= (i - w)[..., None])
            if doc is not None:
                visible = visible & (pos >= doc[..., None])
            out["key_in_memory"] = query & (visible & (pos == key_pos[..., None])).any(-1)
            out["value_in_memory"] = query & (visible & (pos == value_pos[..., None])).any(-1)
            role = torch.gather(roles, 1, pos.clamp(0, length - 1).flatten(1)).view(pos.shape)  # [N, L, S]
            kinds = [
                ~valid,
                valid & ~visible,
                visible & (role == _KEY),
                visible & (role == _VALUE),
                visible & (role == _QUERY),
                visible & (role == 0),
            ]
            out["slots"] = torch.stack([k.sum(-1) for k in kinds], dim=-1)
            mine = (pos == key_pos[..., None]) | (pos == value_pos[..., None])
            out["queried_pair_slots"] = (visible & mine).sum(-1)
        in_memory = out["key_in_memory"] | out["value_in_memory"]
        cls = torch.full((n, length), -1, dtype=torch.long)
        cls[query & ~out["value_in_window"]] = 2
        cls[query & ~out["value_in_window"] & in_memory] = 1
        cls[query & out["value_in_window"]] = 0
        out["cls"] = cls
        out["memory_slots"] = 0 if seen is None else seen[0].shape[-1]
        layers[idx] = out
    return dict(query=query, key_pos=key_pos, correct=correct, layers=layers)


def _share(num, den) -> float | None:
    return None if den == 0 else float(num) / float(den)


def answer_visibility(model, batch, batch_size: int = 100, per_query: bool = False) -> dict:
    """Where each query's key-value pair is, per attention layer, and the model's accuracy in each case.

    Args:
        model: a ``BMojoForCausalLM`` (put in eval mode by the caller; any dtype).
        batch: a ``RecallBatch``, or ``(inputs, labels)``, both ``[N, L]`` long, labels aligned with the inputs
            (``labels[i]`` is the target of position ``i``, ``IGNORE_INDEX`` but at the queries), as
            ``bmojo.evals.recall`` makes them.
        batch_size: rows per forward.
        per_query: also return the per-query tensors under ``"per_query"``.

    Returns:
        ``{"queries": Q, "accuracy": a, "layers": {layer index: {...}}}`` with, per attention-bearing layer,
        ``window``/``memory_slots`` (``W``, ``M`` or 0), ``classes`` (each of ``CLASSES``: ``fraction`` of the
        queries, ``count``, ``accuracy`` of the model on them or None), ``detail`` (fractions of the queries:
        ``key_in_window``, ``value_in_window``, ``key_in_memory``, ``value_in_memory``, ``value_in_fading_span``;
        ``memory_given_outside_window``: the pair held in memory among the queries whose value left the window),
        ``slots`` (fractions of the ``Q * M`` slot observations at the queries in each of ``SLOTS``, and
        ``queried_pair``), ``pair_share_visible`` and ``pair_share_chance`` (see the module docstring; None when
        undefined). ``per_query`` (optional): ``query, correct [N, L]`` bool, ``key_pos [N, L]`` long and per
        layer ``cls [N, L]`` (0 window, 1 memory, 2 neither, -1 not a query) and the boolean tensors of
        ``detail``.

    Raises:
        ValueError: a query without an earlier pair (``pair_positions``).
    """
    inputs, labels = (batch.inputs, batch.labels) if isinstance(batch, RecallBatch) else batch
    if inputs.shape != labels.shape or inputs.dim() != 2:
        raise ValueError(f"inputs and labels must both be [N, L]; got {tuple(inputs.shape)}, {tuple(labels.shape)}")
    parts = [_per_query(model, x, y) for x, y in zip(inputs.split(batch_size), labels.split(batch_size))]

    def cat(get):
        return torch.cat([get(part) for part in parts])

    query, correct = cat(lambda p: p["query"]), cat(lambda p: p["correct"])
    total = int(query.sum())
    result = {"queries": total, "accuracy": _share(correct.sum(), total), "layers": {}}
    per = {"query": query, "correct": correct, "key_pos": cat(lambda p: p["key_pos"]), "layers": {}}
    for idx in parts[0]["layers"]:
        layer = {name: cat(lambda p, name=name: p["layers"][idx][name]) for name in parts[0]["layers"][idx]
                 if name != "memory_slots"}  # fmt: skip
        m = parts[0]["layers"][idx]["memory_slots"]
        cls = layer["cls"]
        classes = {
            name: {
                "fraction": _share((cls == c).sum(), total),
                "count": int((cls == c).sum()),
                "accuracy": _share((correct & (cls == c)).sum(), (cls == c).sum()),
            }
            for c, name in enumerate(CLASSES)
        }
        detail = {
            name: _share(layer[name].sum(), total)
            for name in ("key_in_window", "value_in_window", "key_in_memory", "value_in_memory", "value_in_fading_span")
        }
        outside = query & ~layer["value_in_window"]
        detail["memory_given_outside_window"] = _share((cls == 1).sum(), outside.sum())
        slots = layer["slots"][query]  # [Q, len(SLOTS)]
        observed = total * m
        slot_share = {name: _share(slots[:, s].sum(), observed) for s, name in enumerate(SLOTS)}
        slot_share["queried_pair"] = _share(layer["queried_pair_slots"][query].sum(), observed)
        held = int(slots[:, 2:].sum())
        result["layers"][idx] = {
            "window": model.model.layers[idx].mixer.window,
            "memory_slots": m,
            "classes": classes,
            "detail": detail,
            "slots": slot_share,
            "pair_share_visible": _share(slots[:, 2:4].sum(), held),
            "pair_share_chance": _share(layer["eligible_pair"][query].sum(), layer["eligible"][query].sum()),
        }
        per["layers"][idx] = {k: layer[k] for k in ("cls", *detail) if k in layer}
    if per_query:
        result["per_query"] = per
    return result


# ---------------------------------------------------------------------------------------------------------------
# CLI: train as the ablation driver does, then measure
# ---------------------------------------------------------------------------------------------------------------
RECALL_STUDIES = ("mqar", "long_gap", "predictable_gap", "overwrite", "recall", "capacity")


def best_lrs(path: str) -> dict[str, float]:
    """``{variant: best_lr}`` from an ablation study's ``summary.json``."""
    try:
        summary = json.loads(Path(path).read_text())
        return {name: float(v["best_lr"]) for name, v in summary["variants"].items()}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise BMojoError(f"--lr-from {path}: cannot read best_lr per variant ({type(error).__name__})") from None


def _fmt(x, digits=3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def markdown(results: dict, command: str) -> str:
    """The tables of ``results`` (``{"variants": {name: {...}}}`` as the CLI writes them)."""
    lines = [
        "# Answer visibility on recall (where each query's pair is, per layer)",
        "",
        f"Regenerate: `{command}`",
        "",
        "Classes (module docstring of `bmojo.evals.coverage`): **window** = the answer (value) token is in the "
        "sliding window `[i-W+1, i]`; **memory** = otherwise, the key or value token is in a visible eidetic slot; "
        "**neither** = only the SSM can carry it. `acc` = the model's accuracy on the queries of that class. "
        "`mem|out` = memory share among the queries whose value left the window. Slots: share of the M slots "
        "at the queries that hold a pair key / pair value / a query token / filler, are held but not yet "
        "visible, or empty; `pair vis` = pair tokens' share of visible held slots, `chance` = their share of the "
        "positions a visible slot could hold.",
        "",
        "| variant | lr | kv | layer | acc | window (acc) | memory (acc) | neither (acc) | mem\\|out | "
        "key/value in mem | slots key / value / query / other / not vis / empty | queried pair | pair vis | chance |",
        "|---" * 14 + "|",
    ]
    for name, v in results["variants"].items():
        for key, r in v["sets"].items():
            for idx, layer in r["layers"].items():
                c, d, s = layer["classes"], layer["detail"], layer["slots"]
                cells = [
                    name, f"{v['lr']:g}", key.split("kv=")[-1], str(idx), _fmt(r["accuracy"]),
                    *(f"{_fmt(c[k]['fraction'], 2)} ({_fmt(c[k]['accuracy'], 2)})" for k in CLASSES),
                    _fmt(d["memory_given_outside_window"], 2),
                    f"{_fmt(d['key_in_memory'], 2)} / {_fmt(d['value_in_memory'], 2)}",
                    " / ".join(_fmt(s[k], 2) for k in ("pair_key", "pair_value", "query", "other", "not_visible",
                                                        "empty")),
                    _fmt(s["queried_pair"], 3), _fmt(layer["pair_share_visible"], 2),
                    _fmt(layer["pair_share_chance"], 2),
                ]  # fmt: skip
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _summary_line(name: str, v: dict) -> str:
    parts = []
    for key, r in v["sets"].items():
        last = r["layers"][max(r["layers"])]
        c = {k: _fmt(last["classes"][k]["fraction"], 2) for k in CLASSES}
        parts.append(
            f"kv={key.split('kv=')[-1]} acc {_fmt(r['accuracy'])} (last layer: window {c['window']} memory "
            f"{c['memory']} neither {c['neither']}; pair share {_fmt(last['pair_share_visible'], 2)})"
        )
    return f"{name:18s} lr={v['lr']:g} " + "; ".join(parts)


def _finished_variants(path: Path, specs: dict, test_sets: set) -> dict:
    """``{variant: its result}`` in an earlier ``coverage.json`` at ``path`` that this invocation would compute again:
    the same run spec (settings, overrides, lr, seed) and the same test sets. ``{}`` when there is no file, or one
    that is not what this tool writes (then every variant is computed again)."""
    try:
        earlier = json.loads(path.read_text())["variants"]
        return {
            n: v
            for n, v in earlier.items()
            if n in specs and v["spec"] == specs[n] and isinstance(v["sets"], dict) and set(v["sets"]) == test_sets
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _write(out: Path, results: dict, command: str) -> None:
    write_text_atomic(out / "coverage.json", json.dumps(results, indent=1))
    write_text_atomic(out / "coverage.md", markdown(results, command))


def main(argv=None) -> None:
    from tqdm import tqdm

    from . import ablation

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", choices=RECALL_STUDIES, default="mqar")
    parser.add_argument("--variants", nargs="+", default=["bmojo_new", "bmojo_new_random", "bmojo_new_recency"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=None, help="lr of every variant not in --lr-from (default 3e-3)")
    parser.add_argument("--lr-from", default=None, help="an ablation summary.json: each variant's best_lr")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the study's)")
    parser.add_argument("--pairs", type=int, nargs="+", default=[2, 8, 16], help="test numbers of pairs")
    parser.add_argument("--examples", type=int, default=None, help="test examples per set (default: the study's)")
    parser.add_argument("--quick", action="store_true", help="the ablation's tiny settings (smoke tests)")
    parser.add_argument("--out", default="runs/coverage", help="folder of coverage.json and coverage.md")
    args = parser.parse_args(argv)
    try:
        unknown = [n for n in args.variants if n not in ablation.ALL_VARIANTS]
        if unknown:
            raise BMojoError(f"unknown variant {unknown[0]!r}; choose from {', '.join(ablation.ALL_VARIANTS)}")
        s = ablation.STUDIES[args.study]["settings"]
        if args.quick:
            s = replace(s, **ablation.QUICK)
        if args.steps:
            s = replace(s, steps=args.steps)
        if args.examples:
            s = replace(s, test_examples=args.examples)
        tested = {p for _, _, test in s.tasks for p in test}
        missing = [p for p in args.pairs if p not in tested]
        if missing:
            raise BMojoError(f"--pairs {missing[0]} is not tested in study {args.study}; choose from {sorted(tested)}")
        from_summary = best_lrs(args.lr_from) if args.lr_from else {}
        lrs = {n: from_summary.get(n, 3e-3 if args.lr is None else args.lr) for n in args.variants}
        if args.lr is None and from_summary and any(n not in from_summary for n in args.variants):
            absent = next(n for n in args.variants if n not in from_summary)
            raise BMojoError(f"--lr-from {args.lr_from} has no best_lr for {absent!r}; give --lr")
        configs, specs = {}, {}
        for n in args.variants:
            matched = ablation.matched_config(s, ablation.ALL_VARIANTS[n])
            specs[n] = ablation.run_spec(s, n, ablation.ALL_VARIANTS[n], matched, lrs[n], args.seed)
            configs[n] = ablation.make_config(s, specs[n]["overrides"], specs[n]["intermediate_size"])
    except (BMojoError, ValueError) as error:
        print(f"coverage: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    torch.set_num_threads(1)
    ablation._quiet_saves()  # a progress bar per checkpoint save would drown the tool's own
    given = argv if argv is not None else sys.argv[1:]
    command = "python -m bmojo.evals.coverage " + " ".join(given)
    test = {k: xy for k, xy in ablation.recall_sets(s, "test").items() if int(k.split("kv=")[-1]) in args.pairs}
    results = {"command": command, "settings": asdict(s), "seed": args.seed, "variants": {}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    done = _finished_variants(out / "coverage.json", specs, set(test))
    kept = []  # the variants coverage.json holds (reused or written)
    try:
        with tqdm(total=len(args.variants), desc="coverage", unit="variant") as bar:
            for n in args.variants:
                # a kill loses at most the last CHECKPOINT_SECONDS of training: the next invocation continues from here
                checkpoints = ablation.RunCheckpoints(out / f".{n}_lr={lrs[n]:g}_seed={args.seed}.partial")
                # the same training and test sets as an earlier invocation (killed, say): not trained again
                if n in done:
                    results["variants"][n] = done[n]
                    kept.append(n)
                    checkpoints.remove()  # left by a kill between writing the result and removing them
                    tqdm.write(f"{n}: reusing the result in {out / 'coverage.json'} (delete it to compute again)")
                    bar.update(1)
                    continue
                bar.set_postfix_str(f"training {n} lr={lrs[n]:g}")
                started = time.time()
                model, final_loss = ablation.train_recall(configs[n], lrs[n], args.seed, s, checkpoints)
                bar.set_postfix_str(f"measuring {n}")
                sets = {k: answer_visibility(model, (x, y)) for k, (x, y) in test.items()}
                results["variants"][n] = {
                    "lr": lrs[n], "final_loss": final_loss,
                    "seconds": checkpoints.seconds_before + time.time() - started,
                    "overrides": ablation.ALL_VARIANTS[n], "sets": sets, "spec": specs[n],
                }  # fmt: skip
                if checkpoints.resumed_at_step:
                    results["variants"][n]["resumed_at_step"] = checkpoints.resumed_at_step
                # written after every variant: a killed invocation keeps the finished ones and the next reuses them
                _write(out, results, command)
                kept.append(n)
                checkpoints.remove()
                tqdm.write(_summary_line(n, results["variants"][n]))
                bar.update(1)
        _write(out, results, command)  # also when every variant was reused: the files hold this command's variants
    except KeyboardInterrupt:
        kept = f"the variants measured ({', '.join(kept)}) are kept in {out / 'coverage.json'}" if kept else (
            "nothing is measured yet"
        )  # fmt: skip
        print(
            f"\ncoverage: interrupted; {kept}, and the variant in progress resumes from its last save (at most "
            f"{ablation.CHECKPOINT_SECONDS:g} s of training lost): run the same command again",
            file=sys.stderr,
        )
        raise SystemExit(130) from None
    print(f"wrote {out / 'coverage.json'} and {out / 'coverage.md'}")


if __name__ == "__main__":
    main()
