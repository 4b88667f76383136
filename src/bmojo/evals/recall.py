"""Generated recall tasks for the ablation studies: MQAR, long-gap MQAR (random or predictable filler), key-overwrite
MQAR and a phonebook lookup.

Nothing is downloaded: every example comes from a seeded generator. All four share zoology's conventions (keys from
``[1, V/2)``, values from ``[V/2, V)``, next-token labels aligned with the inputs: ``labels[i]`` is the target of
position ``i``, ``IGNORE_INDEX`` everywhere but at the answers) so one model can train on a mix of them.

    mqar        HazyResearch/zoology's multi-query associative recall, exactly (``mqar.multiquery_ar``):
                ``k1 v1 ... kn vn`` then every key queried once, query slots by zoology's power law, random tokens
                (any token, keys included) everywhere else.
    long_gap    MQAR with ``gap`` filler tokens between the pairs and the query region; with ``gap > 2W`` every
                queried pair lies beyond the window and the fading span of a B'MOJO layer of window ``W``.
    predictable_gap
                long-gap MQAR whose filler (the gap and every non-query position after it) is a counting run,
                ``V/2 + (offset + t) mod (V/2)`` at position ``t`` (``offset`` random per example): after the pairs
                nothing is surprising. The task where the selection rule is the bottleneck: with a gap longer than
                the memory's span, recency keeps filler, random keeps a uniform sample of pairs and filler, and a
                rule that keeps what the state could not predict keeps the pairs (the innovation test, paper §3).
    overwrite   key-overwrite ("forgetting") MQAR, as zoology's ``forgetting_mqar`` poses it: ``n`` pairs, then
                ``u`` more pairs that give ``u`` of the keys a new value; every key is queried once and the answer
                is its LATEST value. All ``n + u`` values of an example are distinct, so the stale value is
                always wrong.
    phonebook   needle in a haystack: ``n`` entries ``first last d1 d2`` (a two-token name, a two-token number),
                random filler, and at the very end one query ``first last`` whose answers are ``d1`` and ``d2``.
                First and last names come from pools of about ``sqrt(n)`` tokens, so no single token names an
                entry: only the pair does.

In ``long_gap``, ``predictable_gap``, ``overwrite`` and ``phonebook`` the filler never holds one of the example's
keys (name tokens), so a key occurs only in its own pairs and in its query: nothing outside the pairs hints at an
answer. (zoology's MQAR fills with any token; ``mqar`` keeps that.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .mqar import IGNORE_INDEX, multiquery_ar

TASKS = ("mqar", "long_gap", "predictable_gap", "overwrite", "phonebook")


@dataclass
class RecallBatch:
    inputs: torch.Tensor  # [N, L] long
    labels: torch.Tensor  # [N, L] long: IGNORE_INDEX except at answers, where it is the answer token
    task: str
    num_pairs: int


def _check(vocab_size: int, input_seq_len: int, needed: int, what: str) -> None:
    if input_seq_len % 2:
        raise ValueError(f"input_seq_len must be even, got {input_seq_len}")
    if vocab_size <= input_seq_len:
        raise ValueError(f"vocab_size ({vocab_size}) must exceed input_seq_len ({input_seq_len})")
    if needed > input_seq_len:
        raise ValueError(f"{what} needs {needed} tokens, more than input_seq_len ({input_seq_len})")


def _distinct(rng: np.random.Generator, rows: int, low: int, high: int, size: int) -> np.ndarray:
    """``[rows, size]`` distinct integers per row from ``[low, high)``, uniformly."""
    if size > high - low:
        raise ValueError(f"cannot draw {size} distinct tokens from [{low}, {high})")
    return np.argsort(rng.random((rows, high - low)), axis=1)[:, :size] + low


def _power_law_slots(rng: np.random.Generator, rows: int, space: int, size: int, power_a: float) -> np.ndarray:
    """``[rows, size]`` distinct slots of ``[0, space)`` drawn without replacement with zoology's weights
    ``a * i^(a-1)`` (early slots favoured): the Gumbel top-k form of successive weighted draws."""
    logw = np.log(power_a * np.arange(1, space + 1) ** (power_a - 1))
    keys = logw + rng.gumbel(size=(rows, space))
    return np.argsort(-keys, axis=1)[:, :size]


def _fill(inputs: np.ndarray, empty: np.ndarray, forbidden: np.ndarray, vocab_size: int, seed: int) -> torch.Tensor:
    """``inputs`` with every ``empty`` position replaced by a random token from ``[1, V)`` that is none of the
    row's ``forbidden`` tokens ``[N, F]``."""
    weights = torch.ones(len(inputs), vocab_size, dtype=torch.float64)
    weights[:, 0] = 0
    weights.scatter_(1, torch.from_numpy(forbidden), 0.0)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.multinomial(weights, inputs.shape[1], replacement=True, generator=generator)
    x = torch.from_numpy(inputs)
    return torch.where(torch.from_numpy(empty), noise, x)


def mqar(vocab_size: int, num_examples: int, input_seq_len: int, seed: int, num_pairs: int) -> RecallBatch:
    """zoology's MQAR, unchanged (``mqar.multiquery_ar``)."""
    b = multiquery_ar(vocab_size, num_examples, input_seq_len, seed, num_kv_pairs=num_pairs)
    return RecallBatch(b.inputs, b.labels, "mqar", num_pairs)


def long_gap(
    vocab_size: int, num_examples: int, input_seq_len: int, seed: int, num_pairs: int, gap: int
) -> RecallBatch:
    """MQAR with ``gap`` filler tokens between the pairs and the queries; the filler holds none of the keys."""
    b = multiquery_ar(vocab_size, num_examples, input_seq_len, seed, num_pairs, random_non_queries=False, gap=gap)
    x = b.inputs.numpy()
    empty = x == 0  # keys and values are never 0: the zeros are exactly the filler
    inputs = _fill(x, empty, x[:, 0 : 2 * num_pairs : 2], vocab_size, seed)
    return RecallBatch(inputs, b.labels, "long_gap", num_pairs)


def predictable_gap(
    vocab_size: int, num_examples: int, input_seq_len: int, seed: int, num_pairs: int, gap: int
) -> RecallBatch:
    """MQAR with ``gap`` filler tokens between the pairs and the query region, and every filler token (the gap and
    the query region's non-query positions) predictable: position ``t`` holds ``V/2 + (offset + t) mod (V/2)``, a
    counting run over the value tokens from a per-example random ``offset``. Filler never holds a key (keys are
    ``< V/2``). Raises ``ValueError`` like ``multiquery_ar`` (too many pairs or too long a gap for the length)."""
    b = multiquery_ar(vocab_size, num_examples, input_seq_len, seed, num_pairs, random_non_queries=False, gap=gap)
    half = vocab_size // 2
    offset = np.random.default_rng(seed).integers(0, vocab_size - half, size=(num_examples, 1))
    counting = torch.from_numpy(half + (offset + np.arange(input_seq_len)) % (vocab_size - half))
    # keys and values are never 0: the zeros are exactly the filler
    return RecallBatch(torch.where(b.inputs == 0, counting, b.inputs), b.labels, "predictable_gap", num_pairs)


def overwrite(
    vocab_size: int,
    num_examples: int,
    input_seq_len: int,
    seed: int,
    num_pairs: int,
    num_updates: int | None = None,
    power_a: float = 0.01,
) -> RecallBatch:
    """Key-overwrite MQAR: ``num_pairs`` pairs, then ``num_updates`` (default ``max(1, num_pairs // 2)``) pairs that
    reassign distinct keys a new value, then the query region (every key once, zoology's power-law slots); each
    label is the key's latest value."""
    updates = max(1, num_pairs // 2) if num_updates is None else num_updates
    if not 1 <= updates <= num_pairs:
        raise ValueError(f"num_updates must be in [1, num_pairs={num_pairs}], got {updates}")
    context = 2 * (num_pairs + updates)
    _check(vocab_size, input_seq_len, context + 2 * num_pairs, f"overwrite MQAR with {num_pairs}+{updates} pairs")
    half = vocab_size // 2
    rng = np.random.default_rng(seed)
    n = num_examples
    keys = _distinct(rng, n, 1, half, num_pairs)
    values = _distinct(rng, n, half, vocab_size, num_pairs + updates)  # distinct: a stale value is never right
    which = _distinct(rng, n, 0, num_pairs, updates)  # indices of the reassigned keys, in update order
    latest = values[:, :num_pairs].copy()
    np.put_along_axis(latest, which, values[:, num_pairs:], axis=1)

    x = np.zeros((n, input_seq_len + 1), dtype=np.int64)
    x[:, 0 : 2 * num_pairs : 2] = keys
    x[:, 1 : 2 * num_pairs : 2] = values[:, :num_pairs]
    x[:, 2 * num_pairs : context : 2] = np.take_along_axis(keys, which, axis=1)
    x[:, 2 * num_pairs + 1 : context : 2] = values[:, num_pairs:]
    slots = _power_law_slots(rng, n, (input_seq_len - context) // 2, num_pairs, power_a)
    np.put_along_axis(x, context + 2 * slots, keys, axis=1)
    y = np.full((n, input_seq_len + 1), IGNORE_INDEX, dtype=np.int64)
    np.put_along_axis(y, context + 2 * slots + 1, latest, axis=1)
    # next-token form: the target of input position i is token i + 1
    inputs, labels = x[:, :-1], torch.from_numpy(y[:, 1:].copy())
    empty = np.zeros_like(inputs, dtype=bool)
    empty[:, context:] = inputs[:, context:] == 0
    return RecallBatch(_fill(inputs, empty, keys, vocab_size, seed), labels, "overwrite", num_pairs)


def phonebook(vocab_size: int, num_examples: int, input_seq_len: int, seed: int, num_pairs: int) -> RecallBatch:
    """``num_pairs`` entries ``first last d1 d2``, filler, and the query ``first last d1 d2`` in the last four
    positions; the labels are ``d1`` (at ``last``) and ``d2`` (at ``d1``). Names are distinct pairs whose tokens
    repeat across entries (first names from ``[1, V/4)``, last names from ``[V/4, V/2)``); numbers are pairs of
    value tokens with distinct ``d1``, so distinct."""
    n_entries = num_pairs
    _check(vocab_size, input_seq_len, 4 * n_entries + 4, f"a phonebook of {n_entries} entries")
    pool = int(np.ceil(np.sqrt(n_entries))) + 1  # pool**2 > n_entries names, yet each token names several entries
    quarter, half = vocab_size // 4, vocab_size // 2
    if pool > quarter - 1 or n_entries > vocab_size - half:
        raise ValueError(f"vocab_size ({vocab_size}) is too small for a phonebook of {n_entries} entries")
    rng = np.random.default_rng(seed)
    n = num_examples
    firsts = _distinct(rng, n, 1, quarter, pool)
    lasts = _distinct(rng, n, quarter, half, pool)
    names = _distinct(rng, n, 0, pool * pool, n_entries)  # distinct (first, last) combinations
    first = np.take_along_axis(firsts, names // pool, axis=1)
    last = np.take_along_axis(lasts, names % pool, axis=1)
    d1 = _distinct(rng, n, half, vocab_size, n_entries)  # distinct first digits: distinct numbers
    d2 = rng.integers(half, vocab_size, size=(n, n_entries))
    asked = rng.integers(0, n_entries, size=(n, 1))

    x = np.zeros((n, input_seq_len), dtype=np.int64)
    for offset, part in enumerate((first, last, d1, d2)):
        x[:, offset : 4 * n_entries : 4] = part
        x[:, input_seq_len - 4 + offset] = np.take_along_axis(part, asked, axis=1)[:, 0]
    labels = torch.full((n, input_seq_len), IGNORE_INDEX, dtype=torch.long)
    labels[:, input_seq_len - 3] = torch.from_numpy(x[:, input_seq_len - 2])
    labels[:, input_seq_len - 2] = torch.from_numpy(x[:, input_seq_len - 1])
    empty = np.zeros_like(x, dtype=bool)
    empty[:, 4 * n_entries : input_seq_len - 4] = True
    inputs = _fill(x, empty, np.concatenate([firsts, lasts], axis=1), vocab_size, seed)
    return RecallBatch(inputs, labels, "phonebook", num_pairs)


def generate(
    task: str, vocab_size: int, num_examples: int, input_seq_len: int, seed: int, num_pairs: int, gap: int = 0
) -> RecallBatch:
    """One task's examples by name (``TASKS``); ``gap`` is the filler length of ``long_gap`` and
    ``predictable_gap`` (ignored by the others)."""
    if task == "mqar":
        return mqar(vocab_size, num_examples, input_seq_len, seed, num_pairs)
    if task == "long_gap":
        return long_gap(vocab_size, num_examples, input_seq_len, seed, num_pairs, gap)
    if task == "predictable_gap":
        return predictable_gap(vocab_size, num_examples, input_seq_len, seed, num_pairs, gap)
    if task == "overwrite":
        return overwrite(vocab_size, num_examples, input_seq_len, seed, num_pairs)
    if task == "phonebook":
        return phonebook(vocab_size, num_examples, input_seq_len, seed, num_pairs)
    raise ValueError(f"unknown recall task {task!r}; choose from {', '.join(TASKS)}")
