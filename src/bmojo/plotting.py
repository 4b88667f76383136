"""The loss curve of a run, from its metrics records, as a PNG (matplotlib's object API: no GUI, no global state)."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure


def plot_loss_curve(records: list[dict], path: str | Path) -> None:
    """Left: training and validation LM loss; right: the innovation predictor's loss (when the model has one)."""
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"]
    fig = Figure(figsize=(11, 4), layout="constrained")
    lm_ax, innovation_ax = fig.subplots(1, 2)
    lm_ax.plot([r["step"] for r in train], [r["lm_loss"] for r in train], alpha=0.6, label="train")
    lm_ax.plot([r["step"] for r in val], [r["lm_loss"] for r in val], "o-", label="validation")
    lm_ax.set(xlabel="step", ylabel="LM loss (nats/token)", title="language-model loss")
    lm_ax.legend()
    lm_ax.grid(alpha=0.3)
    for split, rows in (("train", train), ("validation", val)):
        rows = [r for r in rows if r.get("innovation_loss") is not None]
        innovation_ax.plot([r["step"] for r in rows], [r["innovation_loss"] for r in rows], label=split)
    innovation_ax.set(xlabel="step", ylabel="innovation loss", title="innovation predictor loss")
    if innovation_ax.has_data():
        innovation_ax.legend()
    innovation_ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)
