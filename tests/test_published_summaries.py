"""Every published ablation summary (``docs/eidetic/<name>/summary.json``) is what today's code writes from the run
files committed in ``docs/eidetic/runs*/``, at the grid the docs give for it: a change to how a summary is made
(the lr choice, the grid filter, the statistics) or to a study's settings that would change a published number,
or drop a published run, fails here."""

import json
import shutil
from pathlib import Path

import pytest

from bmojo.evals import ablation as A

DOCS = Path(__file__).resolve().parents[1] / "docs" / "eidetic"

FOUR = "mamba2 bmojo_new bmojo_new_random bmojo_new_recency"  # the per-task studies' variants

# summary folder: (its run files, the arguments of the --summary-only command that writes it; docs/eidetic.md)
PUBLISHED = {
    "mqar": (
        "runs/mqar",
        "--study mqar --lrs 0.0003 0.001 0.003 0.01 0.03 --variants mamba2 transformer bmojo_f bmojo_v0 bmojo_new "
        "bmojo_new_random bmojo_new_recency",
    ),
    "long_gap": (
        "runs/long_gap",
        "--study long_gap --lrs 0.0003 0.001 0.003 0.01 0.03 --variants " + FOUR,
    ),
    "overwrite": (
        "runs/overwrite",
        "--study overwrite --lrs 0.0003 0.001 0.003 0.01 --variants " + FOUR,
    ),
    "phonebook": (
        "runs/phonebook",
        "--study phonebook --lrs 0.0001 0.0003 0.001 0.003 0.01 --variants " + FOUR,
    ),
    "predictable_gap": (
        "runs/predictable_gap",
        "--study predictable_gap --lrs 0.0003 0.001 0.003 0.01 --variants mamba2 bmojo_new bmojo_new_innovation "
        "bmojo_new_random bmojo_new_recency bmojo_new_random_learned",
    ),
    "predictable_gap_5seeds": (
        "runs/predictable_gap",
        "--study predictable_gap --lrs 0.001 0.003 --seeds 0 1 2 3 4 --variants bmojo_new bmojo_new_random "
        "bmojo_new_recency",
    ),
    "predictable_gap_10seeds": (
        "runs/predictable_gap",
        "--study predictable_gap --lrs 0.001 0.003 --seeds 0 1 2 3 4 5 6 7 8 9 --variants bmojo_new bmojo_new_random "
        "bmojo_new_recency",
    ),
    "predictable_gap_2400": (
        "runs2400/predictable_gap",
        "--study predictable_gap --steps 2400 --lrs 0.001 0.003 --seeds 0 1 2 3 4 --variants bmojo_new "
        "bmojo_new_random bmojo_new_recency",
    ),
    "predictable_gap_M32": (
        "runs/predictable_gap_M32",
        "--study predictable_gap --lrs 0.003 --seeds 0 1 2 3 4 --variants bmojo_new_M32 bmojo_new_M32_random "
        "bmojo_new_M32_recency",
    ),
    "lm": (
        "runs/lm",
        "--study lm --lrs 0.001 0.003 0.01 0.03 --variants mamba2 bmojo_f bmojo_v0 bmojo_new bmojo_new_random "
        "bmojo_new_recency",
    ),
    "capacity": ("runs/capacity", "--study capacity --screen --lrs 0.003"),
    "screen": (
        "runs/screen",
        "--study mqar --screen --lrs 0.003 --variants bmojo_v0 bmojo_key0 bmojo_self_key bmojo_learned",
    ),
    "mqar6k": ("runs6k/mqar", "--study mqar --steps 6000 --lrs 0.003"),
    "mqar6k_lr": ("runs6k/mqar", "--study mqar --steps 6000 --lrs 0.001 0.003 0.01 --variants mamba2 bmojo_new"),
    "capacity6k": ("runs6k/capacity", "--study capacity --steps 6000 --lrs 0.003 --seeds 0 1"),
}


def test_every_published_summary_is_checked():
    assert set(PUBLISHED) == {p.parent.name for p in DOCS.glob("*/summary.json")}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_a_published_summary_is_what_the_code_writes_from_its_run_files(name, tmp_path):
    runs, args = PUBLISHED[name]
    argv = args.split()
    study = argv[1]
    shutil.copytree(DOCS / runs, tmp_path / study)
    A.main([*argv, "--out", str(tmp_path), "--summary-only"])
    written = json.loads((tmp_path / study / "summary.json").read_text())
    published = json.loads((DOCS / name / "summary.json").read_text())
    assert written["failed"] == published["failed"]
    assert list(written["variants"]) == list(published["variants"])  # a folder may hold more: --variants
    for variant, row in published["variants"].items():
        same = {k: v for k, v in written["variants"][variant].items() if k in row and k != "seconds_per_run"}
        assert same == {k: v for k, v in row.items() if k != "seconds_per_run"}, variant
