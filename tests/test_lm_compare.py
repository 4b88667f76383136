"""The language-modelling comparison end to end on a tiny corpus: equal parameters and tokens, perplexity of the
same held-out tokens at every length, report files, and reuse of finished runs."""

import json
import math
import random

import pytest
import torch

from bmojo import checkpoint as ckpt
from bmojo.evals.lm_compare import ABLATIONS, QUICK, CompareConfig, ablated, compare, main, perplexity_by_length
from bmojo.evals.variants import VARIANTS

WORDS = ["def", "return", "self", "import", "class", "if", "else", "for", "in", "range", "(x)", ":", "\n    "]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    data = root / "salad.py"
    rng = random.Random(0)
    data.write_text("".join(rng.choice(WORDS) + " " for _ in range(12000)))
    torch.set_num_threads(1)
    main(["--quick", "--data", str(data), "--out", str(root / "docs"), "--runs", str(root / "runs"), "--threads", "1"])
    return root, data


def test_report_has_every_variant_at_equal_parameters_and_tokens(finished):
    root, data = finished
    results = json.loads((root / "docs" / "lm.json").read_text())
    assert list(results["variants"]) == list(VARIANTS)
    counts = [v["parameters"] for v in results["variants"].values()]
    assert max(counts) <= 1.1 * min(counts)
    assert {v["train_tokens"] for v in results["variants"].values()} == {
        QUICK["steps"] * QUICK["batch_size"] * QUICK["seq_len"]
    }
    for v in results["variants"].values():
        assert list(v["perplexity_by_length"]) == [str(x) for x in QUICK["eval_lengths"]]
        assert all(1.0 < p < 400 for p in v["perplexity_by_length"].values())
    table = (root / "docs" / "lm.md").read_text()
    assert f"python -m bmojo.evals.lm_compare --quick --threads 1 --data {data}" in table
    assert (root / "docs" / "lm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_perplexity_by_length_cuts_the_same_tokens_into_windows(finished):
    root, _ = finished
    model = ckpt.load_model(ckpt.list_checkpoints(root / "runs" / "bmojo")[-1])
    tokens = torch.randint(0, 200, (3, 32), generator=torch.Generator().manual_seed(0))
    got = perplexity_by_length(model, tokens, (8, 32), batch_tokens=40)
    with torch.no_grad():
        for length in (8, 32):
            windows = tokens.reshape(-1, length)
            losses = [model(input_ids=w[None], labels=w[None]).lm_loss.item() for w in windows]
            assert got[length] == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)


def test_a_second_run_reuses_the_finished_trainings(finished, tmp_path):
    root, data = finished
    stamps = {v: ckpt.list_checkpoints(root / "runs" / v)[-1].stat().st_mtime_ns for v in VARIANTS}
    cmp = CompareConfig(**QUICK, data=[str(data)], variants=("swa", "bmojo"))
    results = compare(cmp, root / "runs", tmp_path, threads=1, command="x")
    assert {v: ckpt.list_checkpoints(root / "runs" / v)[-1].stat().st_mtime_ns for v in VARIANTS} == stamps
    first = json.loads((root / "docs" / "lm.json").read_text())
    assert results["variants"]["bmojo"]["perplexity_by_length"] == first["variants"]["bmojo"]["perplexity_by_length"]


def test_eval_lengths_must_divide_the_longest_and_include_the_training_length(tmp_path):
    with pytest.raises(ValueError, match="must divide the longest and include seq_len"):
        compare(CompareConfig(**{**QUICK, "eval_lengths": (16, 24)}), tmp_path, tmp_path, 1, "x")


def test_ablations_switch_off_a_memory_of_the_trained_bmojo(finished):
    root, _ = finished
    results = json.loads((root / "docs" / "lm.json").read_text())
    assert set(results["ablations"]) == set(ABLATIONS)
    assert all(list(p) == [str(x) for x in QUICK["eval_lengths"]] for p in results["ablations"].values())
    assert "| as trained |" in (root / "docs" / "lm.md").read_text()
    model = ckpt.load_model(ckpt.list_checkpoints(root / "runs" / "bmojo")[-1]).eval()
    window = model.config.window_size
    tokens = torch.randint(0, 200, (2, 4 * window), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(input_ids=tokens).logits
        for change in ABLATIONS.values():
            part = ablated(model, change).eval()
            assert part.config.memory_size == change.get("memory_size", model.config.memory_size)
            if change.get("fading_self_key") is False and model.config.fading_self_key:
                # the self fading key f_i (on by default) is reached from the first token: switching it off shows
                assert not torch.allclose(part(input_ids=tokens).logits[:, :window], full[:, :window])
            else:
                # Within the window no memory is reached: the same weights give the same logits ...
                torch.testing.assert_close(part(input_ids=tokens).logits[:, :window], full[:, :window])
            # ... beyond it the switched-off memory is missing.
            assert not torch.allclose(part(input_ids=tokens).logits[:, 2 * window :], full[:, 2 * window :])
