"""Multi-query associative recall (MQAR), as HazyResearch/zoology defines it, plus a long-gap variant.

An example is ``k1 v1 k2 v2 ... k_n v_n`` followed by a query region in which every key appears once more; the
model must predict the value right after each queried key. Keys come from ``[1, V/2)``, values from ``[V/2, V)``,
distinct within an example. Query slots follow zoology's power law (``p_i ~ a * i^(a-1)``, ``a = 0.01`` favours
early slots). Labels are ``-100`` except at the queried keys, where the label is the key's value (next-token
prediction: ``inputs = x[:-1]``, ``labels = y[1:]``). Accuracy is the fraction of labelled positions predicted
right, per example, averaged.

The numpy calls follow zoology's order, so a seed gives zoology's keys, values and query slots. Filling the
non-query positions with random tokens uses a ``torch.Generator`` seeded with the same seed (zoology draws those
from torch's global generator).

Long-gap variant (``gap > 0``): ``gap`` random filler tokens sit between the key-value context and the query
region, so with ``gap >= 2W`` every queried pair lies beyond the window and the fading span of a B'MOJO layer
with window ``W``: only the SSM state or the eidetic memory can recall it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

IGNORE_INDEX = -100


@dataclass
class MQARBatch:
    inputs: torch.Tensor  # [N, L] long
    labels: torch.Tensor  # [N, L] long, IGNORE_INDEX except at queried keys
    num_kv_pairs: int
    gap: int


def multiquery_ar(
    vocab_size: int,
    num_examples: int,
    input_seq_len: int,
    seed: int,
    num_kv_pairs: int = 8,
    power_a: float = 0.01,
    random_non_queries: bool = True,
    gap: int = 0,
) -> MQARBatch:
    """Generate ``num_examples`` MQAR sequences of length ``input_seq_len`` (see the module docstring)."""
    if input_seq_len % 2:
        raise ValueError(f"input_seq_len must be even, got {input_seq_len}")
    if vocab_size <= input_seq_len:
        raise ValueError(f"vocab_size ({vocab_size}) must exceed input_seq_len ({input_seq_len})")
    if num_kv_pairs < 1 or 4 * num_kv_pairs + gap > input_seq_len:
        raise ValueError(
            f"need 1 <= num_kv_pairs and 4 * num_kv_pairs + gap <= input_seq_len; got num_kv_pairs={num_kv_pairs}, "
            f"gap={gap}, input_seq_len={input_seq_len}"
        )
    if gap < 0 or gap % 2:
        raise ValueError(f"gap must be a non-negative even number, got {gap}")
    if num_kv_pairs >= vocab_size // 2:
        raise ValueError(f"num_kv_pairs ({num_kv_pairs}) must be smaller than vocab_size // 2 ({vocab_size // 2})")

    np.random.seed(seed)
    context = 2 * num_kv_pairs
    half = vocab_size // 2
    key_pool = np.tile(np.arange(1, half), (num_examples, 1))
    keys = np.apply_along_axis(np.random.choice, 1, key_pool, replace=False, size=num_kv_pairs)
    value_pool = np.tile(np.arange(half, vocab_size), (num_examples, 1))
    values = np.apply_along_axis(np.random.choice, 1, value_pool, replace=False, size=num_kv_pairs)

    kvs = np.zeros((num_examples, context), dtype=np.int64)
    kvs[:, 0::2] = keys
    kvs[:, 1::2] = values

    # Query slots: one per pair, drawn without replacement under the power law.
    query_len = input_seq_len - context - gap
    space = query_len // 2
    weights = power_a * np.arange(1, space + 1) ** (power_a - 1)
    weights = weights / weights.sum()
    slots = np.stack([np.arange(space, dtype=int)] * num_examples)
    slot_of_pair = np.apply_along_axis(np.random.choice, 1, slots, replace=False, p=weights, size=num_kv_pairs)

    queries = np.zeros((num_examples, query_len + 1), dtype=np.int64)
    np.put_along_axis(queries, 2 * slot_of_pair, keys, axis=1)
    filler = np.zeros((num_examples, gap), dtype=np.int64)
    sequence = np.concatenate([kvs, filler, queries], axis=1)

    target = np.full((num_examples, input_seq_len + 1), IGNORE_INDEX, dtype=np.int64)
    np.put_along_axis(target, 2 * slot_of_pair + context + gap + 1, values, axis=1)

    inputs = torch.tensor(sequence[:, :-1])
    labels = torch.tensor(target[:, 1:])
    if random_non_queries:
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randint(vocab_size, inputs.shape, generator=generator)
        inputs = torch.where(inputs == 0, noise, inputs)
    return MQARBatch(inputs, labels, num_kv_pairs, gap)


def mqar_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example accuracy over labelled positions (zoology's metric): ``[N]``. ``logits [N, L, V]``."""
    labelled = labels != IGNORE_INDEX
    correct = (logits.argmax(-1) == labels) & labelled
    return correct.sum(-1).float() / labelled.sum(-1).clamp_min(1).float()
