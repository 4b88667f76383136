"""MQAR generator invariants (zoology's definition) and the long-gap variant."""

import numpy as np
import pytest
import torch

from bmojo.evals.mqar import IGNORE_INDEX, mqar_accuracy, multiquery_ar


@pytest.mark.parametrize("length,pairs,gap", [(64, 4, 0), (128, 8, 0), (256, 16, 0), (256, 8, 96), (64, 16, 0)])
def test_generator_invariants(length, pairs, gap):
    vocab = 8192
    batch = multiquery_ar(vocab, 50, length, seed=3, num_kv_pairs=pairs, gap=gap)
    inputs, labels = batch.inputs, batch.labels
    assert inputs.shape == labels.shape == (50, length) and inputs.dtype == torch.long
    assert int(inputs.min()) >= 0 and int(inputs.max()) < vocab
    for x, y in zip(inputs.tolist(), labels.tolist()):
        keys, values = x[0 : 2 * pairs : 2], x[1 : 2 * pairs : 2]
        assert len(set(keys)) == pairs and all(1 <= k < vocab // 2 for k in keys)
        assert len(set(values)) == pairs and all(vocab // 2 <= v < vocab for v in values)
        value_of = dict(zip(keys, values))
        labelled = [i for i, t in enumerate(y) if t != IGNORE_INDEX]
        assert len(labelled) == pairs  # every pair is queried exactly once
        for i in labelled:
            # the label sits at the queried key's position and is that key's value
            assert i >= 2 * pairs + gap and x[i] in value_of and y[i] == value_of[x[i]]
        assert sorted(x[i] for i in labelled) == sorted(keys)


def test_query_slots_follow_the_power_law_towards_early_slots():
    batch = multiquery_ar(8192, 400, 256, seed=0, num_kv_pairs=4)
    first = (batch.labels != IGNORE_INDEX).float().argmax(-1) - 8  # offset of the first query in its region
    # a = 0.01: the first slots are far more likely than uniform (uniform would put the median near 60)
    assert first.median() < 20


def test_same_seed_same_data_and_matches_zoology_numpy_order():
    a = multiquery_ar(1024, 8, 64, seed=11, num_kv_pairs=4, random_non_queries=False)
    b = multiquery_ar(1024, 8, 64, seed=11, num_kv_pairs=4, random_non_queries=False)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)
    # zoology draws the keys first, with np.random.seed(seed) and np.random.choice per row
    np.random.seed(11)
    first_keys = np.random.choice(np.arange(1, 512), replace=False, size=4)
    assert a.inputs[0, 0:8:2].tolist() == first_keys.tolist()
    # without random fill, everything outside context and queried keys is 0
    queried = torch.zeros_like(a.inputs, dtype=torch.bool)
    queried[:, :8] = True
    queried |= a.labels != IGNORE_INDEX
    assert int(a.inputs[~queried].abs().sum()) == 0


def test_long_gap_puts_every_query_beyond_the_gap():
    window = 16
    batch = multiquery_ar(4096, 20, 256, seed=1, num_kv_pairs=8, gap=2 * window + 32)
    pos = torch.nonzero(batch.labels != IGNORE_INDEX)[:, 1]
    # the last key-value pair ends at 2*8-1 = 15; every query is more than 2W after it
    assert int(pos.min()) - 15 > 2 * window


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(input_seq_len=63), "input_seq_len must be even"),
        (dict(vocab_size=64), r"vocab_size \(64\) must exceed input_seq_len"),
        (dict(num_kv_pairs=20), r"4 \* num_kv_pairs \+ gap <= input_seq_len"),
        (dict(gap=3), "gap must be a non-negative even number"),
    ],
)
def test_bad_arguments(kwargs, message):
    args = dict(vocab_size=8192, num_examples=2, input_seq_len=64, seed=0, num_kv_pairs=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        multiquery_ar(**args)


def test_accuracy_counts_only_labelled_positions():
    labels = torch.full((2, 5), IGNORE_INDEX)
    labels[0, 1], labels[0, 3], labels[1, 4] = 7, 2, 1
    logits = torch.zeros(2, 5, 9)
    logits[0, 1, 7] = logits[0, 3, 5] = logits[1, 4, 1] = 1.0
    logits[0, 0, 3] = 5.0  # unlabelled positions never count
    assert mqar_accuracy(logits, labels).tolist() == [0.5, 1.0]
