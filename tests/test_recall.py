"""The generated recall tasks: answers correct by construction, overwrite answers the latest, lengths, no leakage."""

import pytest
import torch

from bmojo.evals.mqar import IGNORE_INDEX, multiquery_ar
from bmojo.evals.recall import TASKS, generate, long_gap, overwrite, phonebook, predictable_gap

V, L = 128, 64


def rows(batch):
    return zip(batch.inputs.tolist(), batch.labels.tolist())


@pytest.mark.parametrize("task", TASKS)
def test_shapes_ranges_and_seeds(task):
    a = generate(task, V, 40, L, seed=5, num_pairs=4, gap=24)
    b = generate(task, V, 40, L, seed=5, num_pairs=4, gap=24)
    c = generate(task, V, 40, L, seed=6, num_pairs=4, gap=24)
    assert a.inputs.shape == a.labels.shape == (40, L) and a.inputs.dtype == a.labels.dtype == torch.long
    assert int(a.inputs.min()) >= 0 and int(a.inputs.max()) < V
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)
    # a different seed: no example of one split repeats in the other (train/validation/test do not leak)
    assert not {tuple(x) for x in a.inputs.tolist()} & {tuple(x) for x in c.inputs.tolist()}
    answers = a.labels[a.labels != IGNORE_INDEX]
    assert bool(((answers >= V // 2) & (answers < V)).all())  # every answer is a value token


def test_mqar_is_zoologys_generator_unchanged():
    a = generate("mqar", V, 8, L, seed=3, num_pairs=8)
    b = multiquery_ar(V, 8, L, seed=3, num_kv_pairs=8)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)


@pytest.mark.parametrize("pairs", [2, 4, 8])
def test_long_gap_answers_each_pair_beyond_the_gap_and_the_filler_holds_no_key(pairs):
    gap = 24
    batch = long_gap(V, 50, L, seed=1, num_pairs=pairs, gap=gap)
    for x, y in rows(batch):
        keys, values = x[0 : 2 * pairs : 2], x[1 : 2 * pairs : 2]
        value_of = dict(zip(keys, values))
        labelled = [i for i, t in enumerate(y) if t != IGNORE_INDEX]
        assert sorted(x[i] for i in labelled) == sorted(keys)  # each key queried once
        assert all(y[i] == value_of[x[i]] and i - (2 * pairs - 1) > gap for i in labelled)
        # a key occurs only in its pair and at its query
        assert sorted(i for i, t in enumerate(x) if t in value_of) == sorted(list(range(0, 2 * pairs, 2)) + labelled)


@pytest.mark.parametrize("pairs", [2, 4, 8])
def test_predictable_gap_is_long_gap_mqar_with_a_counting_filler(pairs):
    gap, length = 64, 120
    batch = predictable_gap(V, 50, length, seed=3, num_pairs=pairs, gap=gap)
    offsets = set()
    for x, y in rows(batch):
        keys, values = x[0 : 2 * pairs : 2], x[1 : 2 * pairs : 2]
        value_of = dict(zip(keys, values))
        labelled = [i for i, t in enumerate(y) if t != IGNORE_INDEX]
        assert sorted(x[i] for i in labelled) == sorted(keys)  # each key queried once, beyond the gap
        assert all(y[i] == value_of[x[i]] and i - (2 * pairs - 1) > gap for i in labelled)
        filler = [i for i in range(2 * pairs, length) if i not in labelled]
        assert len(filler) == length - 3 * pairs
        # every filler token continues one counting run over the value tokens: predictable from its position
        offset = (x[filler[0]] - V // 2 - filler[0]) % (V // 2)
        assert all(x[i] == V // 2 + (offset + i) % (V // 2) for i in filler)
        offsets.add(offset)
        assert not set(keys) & {x[i] for i in filler}  # the filler holds no key
    assert len(offsets) > 10  # the run starts at a random point per example
    # the pairs and queries are zoology's (the long-gap generator with the same seed), only the filler differs
    other = long_gap(V, 50, length, seed=3, num_pairs=pairs, gap=gap)
    assert torch.equal(batch.labels, other.labels)
    answers = batch.labels != IGNORE_INDEX
    assert torch.equal(batch.inputs[:, : 2 * pairs], other.inputs[:, : 2 * pairs])
    assert torch.equal(batch.inputs[answers], other.inputs[answers])


@pytest.mark.parametrize("pairs,updates", [(4, 2), (8, 4), (6, 6), (3, None)])
def test_overwrite_answers_are_the_latest_value(pairs, updates):
    u = updates or max(1, pairs // 2)
    batch = overwrite(V, 50, L, seed=2, num_pairs=pairs, num_updates=updates)
    context = 2 * (pairs + u)
    stale_seen = 0
    for x, y in rows(batch):
        latest, first = {}, {}
        for i in range(0, context, 2):
            first.setdefault(x[i], x[i + 1])
            latest[x[i]] = x[i + 1]  # a later pair overwrites
        assert len(latest) == pairs and len(set(x[1:context:2])) == pairs + u  # n keys, all values distinct
        assert sum(first[k] != latest[k] for k in latest) == u
        labelled = [i for i, t in enumerate(y) if t != IGNORE_INDEX]
        assert sorted(x[i] for i in labelled) == sorted(latest)
        for i in labelled:
            assert i >= context and y[i] == latest[x[i]]
            stale_seen += first[x[i]] != y[i]
        keys_at = [i for i, t in enumerate(x) if t in latest]
        assert sorted(keys_at) == sorted(list(range(0, context, 2)) + labelled)  # no key in the filler
    assert stale_seen == 50 * u  # every reassigned key is asked, and its answer is not the first value


@pytest.mark.parametrize("entries", [1, 4, 12, 15])
def test_phonebook_answers_the_queried_entrys_number(entries):
    batch = phonebook(V, 60, L, seed=4, num_pairs=entries)
    for x, y in rows(batch):
        book = {(x[i], x[i + 1]): (x[i + 2], x[i + 3]) for i in range(0, 4 * entries, 4)}
        assert len(book) == entries and len({d[0] for d in book.values()}) == entries  # distinct names, numbers
        name = (x[L - 4], x[L - 3])
        assert [i for i, t in enumerate(y) if t != IGNORE_INDEX] == [L - 3, L - 2]
        assert (y[L - 3], y[L - 2]) == book[name] == (x[L - 2], x[L - 1])
        name_tokens = {t for n in book for t in n}
        assert not name_tokens & set(x[4 * entries : L - 4])  # the haystack holds no name token
    # names share tokens across entries: one token alone does not identify an entry
    x = batch.inputs[0].tolist()
    if entries >= 4:
        assert len({x[i] for i in range(0, 4 * entries, 4)}) < entries


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: overwrite(V, 2, L, 0, num_pairs=8, num_updates=9), r"num_updates must be in \[1, num_pairs=8\]"),
        (lambda: overwrite(V, 2, L, 0, num_pairs=14), "needs 70 tokens, more than input_seq_len"),
        (lambda: phonebook(V, 2, L, 0, num_pairs=16), "needs 68 tokens, more than input_seq_len"),
        (lambda: phonebook(V, 2, 63, 0, num_pairs=2), "input_seq_len must be even"),
        (lambda: generate("bogus", V, 2, L, 0, 2), "unknown recall task 'bogus'"),
        (lambda: predictable_gap(V, 2, L, 0, num_pairs=8, gap=40), "4 \\* num_kv_pairs \\+ gap <= input_seq_len"),
    ],
)
def test_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()
