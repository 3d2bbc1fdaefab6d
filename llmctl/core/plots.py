"""PNG plots of training metrics (matplotlib, headless Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_metrics(
    records: list[dict[str, Any]], path: Path, *, title: str, baseline: float | None = None
) -> Path | None:
    """Loss (train and validation) and learning rate against step; None if there is nothing to plot."""
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=[3, 1])
    ax.plot(*zip(*train, strict=True), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="val loss")
    if baseline is not None:
        ax.axhline(baseline, ls="--", color="gray", label=f"unigram baseline {baseline:.2f}")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    ax_lr.plot(
        [r["step"] for r in records if "lr" in r],
        [r["lr"] for r in records if "lr" in r],
        color="tab:green",
    )
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
