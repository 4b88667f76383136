"""Answer visibility (bmojo.evals.coverage): the memory it reads is the decoding cache's, its classes are the
attention's window and memory visibility, computed by hand from positions where selection is by position."""

import json

import pytest
import torch

from bmojo.cache import BMojoCache
from bmojo.evals import ablation
from bmojo.evals.coverage import answer_visibility, captured_attention, main, pair_positions
from bmojo.evals.mqar import IGNORE_INDEX, mqar_accuracy
from bmojo.evals.recall import RecallBatch, generate
from support import Killed, count_training_steps, die_after_saving, tiny_model

W, C, K = 8, 4, 2  # the tiny preset's window, chunk and picks per chunk


def _mqar(rows=3, length=48, pairs=6, seed=0):
    return generate("mqar", 64, rows, length, seed, pairs)


def _edge_batch(length=48):
    """One query per row, at the last position, whose pair lies ``d = 2 .. length - 1`` tokens back: every edge of
    the window and of memory visibility. Filler from ``[40, 64)``, keys from ``[3, 20)``, values from ``[20, 40)``."""
    gen = torch.Generator().manual_seed(5)
    rows = length - 2
    x = torch.randint(40, 64, (rows, length), generator=gen)
    y = torch.full((rows, length), IGNORE_INDEX)
    for r, d in enumerate(range(2, length)):
        key, value = 3 + r % 17, 20 + r % 20
        x[r, length - 1 - d], x[r, length - d], x[r, -1], y[r, -1] = key, value, key, value
    return RecallBatch(x, y, "edges", 1)


def _valid_positions(pos, score):
    """Sorted held positions per row: ``[R, S]`` -> list of lists."""
    return [sorted(p[s >= 0].tolist()) for p, s in zip(pos, score)]


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # the defaults: innovation + learned selection, window_exit admission
        dict(memory_admission="chunk"),
        dict(selection_score="recency", learned_selection=False),
        dict(memory_per_kv_head=True, key_set_bias=False),
    ],
    ids=["defaults", "chunk_admission", "recency", "per_head"],
)
def test_the_memory_read_is_the_one_the_decoding_cache_holds_at_every_token(overrides):
    model = tiny_model(**overrides)  # float64
    x = _mqar(rows=2).inputs
    with torch.no_grad(), captured_attention(model) as records:
        model(input_ids=x)
    layers = [i for i, r in records.items() if r["memory"] is not None]
    assert layers == [0, 1]
    cache = BMojoCache.empty(model.config, 2, dtype=torch.float64)
    heads = model.config.num_key_value_heads if model.config.memory_per_kv_head else 1
    with torch.no_grad():
        for t in range(x.shape[1]):
            model.model.step(x[:, t], cache)
            for i in layers:
                mem = cache.layers[i].eidetic
                got = records[i]["memory"]
                parallel = _valid_positions(got.pos[:, t // C], got.score[:, t // C])
                decoded = _valid_positions(mem.mem_pos.reshape(2 * heads, -1), mem.mem_score.reshape(2 * heads, -1))
                assert parallel == decoded, (t, i)
    assert all(len(p) == model.config.memory_size for p in decoded)  # full: slots were evicted on the way


def _hand_memory(i, memory_size, delay):
    """Recency selection by hand: chunk c' picks its last K positions; the memory chunk i // C sees holds the
    ``memory_size`` newest picks of chunks <= i // C - 1 - delay."""
    last = i // C - 1 - delay
    picks = [c * C + r for c in range(last + 1) for r in range(C - K, C)]
    return sorted(picks)[-memory_size:] if memory_size else []


@pytest.mark.parametrize("admission", ["window_exit", "chunk"])
@pytest.mark.parametrize("kind", ["mqar", "edges"])
def test_with_recency_selection_the_classes_are_a_hand_computation_from_positions(admission, kind):
    m = 12
    model = tiny_model(selection_score="recency", learned_selection=False, memory_admission=admission, memory_size=m)
    batch = _mqar(rows=4) if kind == "mqar" else _edge_batch()
    got = answer_visibility(model, batch, batch_size=3, per_query=True)
    per = got["per_query"]
    delay = W // C if admission == "window_exit" else 0
    x, y = batch.inputs.tolist(), batch.labels.tolist()
    hand_cls = torch.full(batch.inputs.shape, -1)
    hand_pair_slots = held = 0
    for b in range(len(x)):
        pairs = {j for i in range(len(x[b])) if y[b][i] != IGNORE_INDEX
                 for p in [next(p for p in range(i - 1) if x[b][p] == x[b][i] and x[b][p + 1] == y[b][i])]
                 for j in (p, p + 1)}  # fmt: skip
        for i in range(len(x[b])):
            if y[b][i] == IGNORE_INDEX:
                continue
            p = next(p for p in range(i - 1) if x[b][p] == x[b][i] and x[b][p + 1] == y[b][i])
            visible = [j for j in _hand_memory(i, m, delay) if j <= i - W]
            hand_cls[b, i] = 0 if p + 1 > i - W else 1 if (p in visible or p + 1 in visible) else 2
            hand_pair_slots += sum(j in pairs for j in visible)
            held += len(visible)
    for layer in (0, 1):  # recency ranks by position alone: both layers hold the same tokens
        assert torch.equal(per["layers"][layer]["cls"], hand_cls)
    assert all((hand_cls == c).any() for c in (0, 1, 2))  # every class occurs, memory included
    stats = got["layers"][1]
    assert stats["pair_share_visible"] == pytest.approx(hand_pair_slots / held)
    correct, cls = per["correct"], hand_cls
    assert stats["classes"]["memory"]["accuracy"] == pytest.approx(float(correct[cls == 1].float().mean()))
    assert sum(v["count"] for v in stats["classes"].values()) == got["queries"] == int((cls >= 0).sum())


def test_without_memory_nothing_is_in_memory():
    model = tiny_model(memory_size=0)
    got = answer_visibility(model, _mqar(), per_query=True)
    for idx, layer in got["layers"].items():
        assert layer["memory_slots"] == 0 and layer["classes"]["memory"]["count"] == 0
        assert not got["per_query"]["layers"][idx]["key_in_memory"].any()
        assert layer["classes"]["window"]["count"] + layer["classes"]["neither"]["count"] == got["queries"]


def test_window_classes_are_the_attentions_mask_a_perturbed_token_changes_the_query_iff_inside():
    # One sliding-window attention layer: the logits at i depend on exactly the tokens the window holds.
    model = tiny_model(layers_block_type=["attention"], num_hidden_layers=1, use_fading=False, memory_size=0)
    batch = _edge_batch(length=2 * W + 4)
    per = answer_visibility(model, batch, per_query=True)["per_query"]
    x = batch.inputs
    with torch.no_grad():
        base = model(input_ids=x).logits
    seen = {True: 0, False: 0}
    for b, i in per["query"].nonzero().tolist():
        for name, p in (("key_in_window", per["key_pos"][b, i]), ("value_in_window", per["key_pos"][b, i] + 1)):
            changed = x.clone()
            changed[b, p] = (changed[b, p] + 1) % 64
            with torch.no_grad():
                moved = not torch.equal(model(input_ids=changed).logits[b, i], base[b, i])
            assert moved == bool(per["layers"][0][name][b, i]), (b, i, name)
            seen[moved] += 1
    assert seen[True] and seen[False]  # both sides of the window's edge are exercised


def test_a_query_whose_pair_sits_in_a_visible_slot_is_counted_in_memory():
    model = tiny_model(memory_size=16)
    batch = _mqar(rows=2)
    with torch.no_grad(), captured_attention(model) as records:
        model(input_ids=batch.inputs)
    got = answer_visibility(model, batch, per_query=True)["per_query"]
    memory = records[1]["memory"]
    found = 0
    for b, i in got["query"].nonzero().tolist():
        p = int(got["key_pos"][b, i])
        slots = memory.pos[b, i // C][(memory.score[b, i // C] >= 0) & (memory.pos[b, i // C] <= i - W)].tolist()
        if p + 1 <= i - W and (p in slots or p + 1 in slots):
            assert got["layers"][1]["cls"][b, i] == 1
            found += 1
        elif p + 1 <= i - W:
            assert got["layers"][1]["cls"][b, i] == 2
    assert found


def test_pairs_are_found_from_the_inputs_and_accuracy_is_mqars():
    batch = _mqar(rows=5)
    query, key_pos = pair_positions(batch.inputs, batch.labels)
    rows, cols = query.nonzero().T
    assert torch.equal(batch.inputs[rows, key_pos[rows, cols]], batch.inputs[rows, cols])
    assert torch.equal(batch.inputs[rows, key_pos[rows, cols] + 1], batch.labels[rows, cols])
    assert (key_pos[rows, cols] < 12).all()  # MQAR's pairs are the first 2 * 6 tokens
    model = tiny_model()
    with torch.no_grad():
        expected = float(mqar_accuracy(model(input_ids=batch.inputs).logits, batch.labels).mean())
    assert answer_visibility(model, batch)["accuracy"] == pytest.approx(expected)  # same queries per example


def test_a_query_without_its_pair_is_refused():
    batch = _mqar(rows=1)
    labels = batch.labels.clone()
    i = int((labels[0] != IGNORE_INDEX).nonzero()[0])
    labels[0, i] = 1  # no key is followed by token 1 (keys are never values)
    with pytest.raises(ValueError, match=f"query at row 0, position {i} has no earlier key-value pair"):
        pair_positions(batch.inputs, labels)


def test_train_recall_is_run_recalls_training():
    s = ablation.replace(ablation.STUDIES["mqar"]["settings"], **ablation.QUICK)
    config = ablation.matched_config(s, ablation.VARIANTS["bmojo_new"])
    model, loss = ablation.train_recall(config, 3e-3, 0, s)
    record = ablation.run_recall(config, 3e-3, 0, s)
    assert record["final_loss"] == loss
    assert record["test"] == ablation.recall_accuracy(model, ablation.recall_sets(s, "test"))


def test_cli_writes_json_and_markdown(tmp_path, capsys):
    main(["--quick", "--variants", "bmojo_new", "swa", "--pairs", "2", "--out", str(tmp_path), "--lr", "0.01"])
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines()[:2]] == ["bmojo_new", "swa"]
    assert (tmp_path / "coverage.json").exists()
    md = (tmp_path / "coverage.md").read_text()
    assert "Regenerate: `python -m bmojo.evals.coverage --quick --variants bmojo_new swa" in md
    assert "| bmojo_new | 0.01 | 2 | 0 |" in md


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--variants", "nope"], "unknown variant 'nope'; choose from mamba2,"),
        (["--pairs", "3"], "--pairs 3 is not tested in study mqar; choose from [2, 4, 8, 12, 16]"),
        (["--lr-from", "/nonexistent.json"], "--lr-from /nonexistent.json: cannot read best_lr per variant"),
    ],
)
def test_bad_input_is_one_error_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f"coverage: error: {message}"), err


def test_a_killed_invocation_keeps_finished_variants_and_resumes_the_one_in_training(tmp_path, monkeypatch, capsys):
    """The same command after a kill trains nothing already measured (the finished variant is reused, not retrained)
    and continues the variant in training from its save: only the remaining steps run (counted) and the result is
    the uninterrupted invocation's."""
    argv = ["--quick", "--steps", "8", "--variants", "bmojo_new", "swa", "--pairs", "2", "--lr", "0.01", "--out"]
    main([*argv, str(tmp_path / "whole")])
    whole = json.loads((tmp_path / "whole" / "coverage.json").read_text())["variants"]

    out = tmp_path / "killed"
    monkeypatch.setattr(ablation, "CHECKPOINT_SECONDS", 0.0)
    real = die_after_saving(monkeypatch, ablation, 5, folder_prefix=".swa_")
    with pytest.raises(Killed):
        main([*argv, str(out)])
    assert list(json.loads((out / "coverage.json").read_text())["variants"]) == ["bmojo_new"]
    monkeypatch.setattr(ablation, "save_checkpoint", real)
    steps = count_training_steps(monkeypatch)
    capsys.readouterr()
    main([*argv, str(out)])
    assert "bmojo_new: reusing the result" in capsys.readouterr().out
    assert len(steps) == 3
    again = json.loads((out / "coverage.json").read_text())["variants"]
    assert again["swa"].pop("resumed_at_step") == 5
    for v in (*whole.values(), *again.values()):
        v.pop("seconds")
    assert again == whole
    assert not [p for p in out.iterdir() if p.name.endswith(".partial")]  # removed once measured

    # another lr (or seed, settings, test sets) is another result: trained again, not reused
    steps.clear()
    main(["--quick", "--steps", "8", "--variants", "bmojo_new", "--pairs", "2", "--lr", "0.003", "--out", str(out)])
    assert len(steps) == 8


@pytest.mark.parametrize("where", ["training bmojo_new", "training swa", "measuring swa"])
def test_ctrl_c_is_one_line_and_exit_status_130_and_the_same_command_resumes(where, tmp_path, monkeypatch, capsys):
    import bmojo.evals.coverage as coverage

    argv = ["--quick", "--steps", "8", "--variants", "bmojo_new", "swa", "--pairs", "2", "--lr", "0.01"]
    argv += ["--out", str(tmp_path)]
    monkeypatch.setattr(ablation, "CHECKPOINT_SECONDS", 0.0)
    phase, variant = where.split()
    real = die_after_saving(monkeypatch, ablation, 5, folder_prefix=f".{variant}_", raising=KeyboardInterrupt)
    if phase == "measuring":  # trained to the end, interrupted while its answers are read
        monkeypatch.setattr(ablation, "save_checkpoint", real)
        measure = coverage.answer_visibility

        def interrupted_on_swa(model, xy):
            if model.config.layers_block_type[0] == "attention":
                raise KeyboardInterrupt
            return measure(model, xy)

        monkeypatch.setattr(coverage, "answer_visibility", interrupted_on_swa)
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 130
    kept = "nothing is measured yet" if variant == "bmojo_new" else (
        f"the variants measured (bmojo_new) are kept in {tmp_path / 'coverage.json'}"
    )  # fmt: skip
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"coverage: interrupted; {kept}, and the variant in progress resumes from its last save (at most 0 s of "
        "training lost): run the same command again"
    )
    measured = json.loads((tmp_path / "coverage.json").read_text())["variants"] if variant == "swa" else {}
    assert list(measured) == (["bmojo_new"] if variant == "swa" else [])
    monkeypatch.undo()  # the real functions again; every save is kept from here
    monkeypatch.setattr(ablation, "CHECKPOINT_SECONDS", 0.0)
    steps = count_training_steps(monkeypatch)
    main(argv)
    # the measured variant reused; the one in progress continued from its last save (step 5 in training; when
    # measuring, the last save before the end) and trained to step 8; swa trained whole after bmojo_new
    resumed = json.loads((tmp_path / "coverage.json").read_text())["variants"][variant]["resumed_at_step"]
    assert resumed == 5 if phase == "training" else 5 <= resumed < 8
    assert len(steps) == 8 - resumed + (8 if variant == "bmojo_new" else 0)


def test_reused_results_are_written_again_and_saves_left_beside_them_removed(tmp_path, monkeypatch, capsys):
    """A kill between writing coverage.json and coverage.md (or between the result and removing its saves) is
    repaired by the next invocation, which reuses every variant: both files hold this command's variants, no
    ``.partial`` folder stays."""
    out = tmp_path / "out"
    argv = ["--quick", "--variants", "bmojo_new", "swa", "--pairs", "2", "--lr", "0.01", "--out", str(out)]
    main(argv)
    md = (out / "coverage.md").read_text()
    (out / "coverage.md").write_text("stale")
    ablation.RunCheckpoints(out / ".swa_lr=0.01_seed=0.partial").folder.mkdir()
    steps = count_training_steps(monkeypatch)
    main(argv)
    assert steps == [] and (out / "coverage.md").read_text() == md
    assert not [p for p in out.iterdir() if p.name.endswith(".partial")]
    main([*argv[:-4], "--lr", "0.01", "--out", str(out), "--variants", "swa"])  # a narrower command, all reused
    assert steps == [] and list(json.loads((out / "coverage.json").read_text())["variants"]) == ["swa"]
    assert "| bmojo_new |" not in (out / "coverage.md").read_text()


@pytest.mark.parametrize(
    "text",
    ["{", "[]", '{"variants": null}', '{"variants": []}', '{"variants": {"swa": 1}}', '{"variants": {"swa": {}}}'],
)
def test_a_coverage_json_it_did_not_write_is_computed_again_not_a_crash(text, tmp_path, monkeypatch):
    (tmp_path / "coverage.json").write_text(text)
    steps = count_training_steps(monkeypatch)
    main(["--quick", "--variants", "swa", "--pairs", "2", "--out", str(tmp_path)])
    assert len(steps) == ablation.QUICK["steps"]
    assert list(json.loads((tmp_path / "coverage.json").read_text())["variants"]) == ["swa"]
