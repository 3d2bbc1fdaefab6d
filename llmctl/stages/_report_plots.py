"""PNG figures for `llmctl report` (matplotlib, headless Agg backend). Each returns the path it wrote,
or None when there is nothing to draw."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# metrics.jsonl keys drawn for each kind of training run, one panel each, in this order.
# A panel's key is drawn only where the metrics have it (rm and dpo add accuracy and margin).
PANELS = {
    "lm": ("loss", "lr", "grad_norm", "tokens_per_s", "train_accuracy", "train_margin"),
    "ppo": ("score", "kl", "entropy", "response_len", "grad_norm", "tokens_per_s"),
}
OVERLAYS = {"loss": "val_loss", "train_accuracy": "val_accuracy", "train_margin": "val_margin"}
TITLES = {"score": "reward (reward-model score)", "kl": "KL to the reference"}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["step"], r[key]) for r in records if key in r and "step" in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def training_curves(
    records: list[dict[str, Any]], path: Path, *, title: str, panels: tuple[str, ...]
) -> Path | None:
    """One panel per metric against step; validation loss is overlaid on the loss panel."""
    shown = [k for k in panels if _series(records, k)[0]]
    if not shown:
        return None
    plt = _plt()
    cols = 2 if len(shown) > 1 else 1
    rows = (len(shown) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 2.8 * rows), squeeze=False)
    for ax, key in zip(axes.flat, shown, strict=False):
        xs, ys = _series(records, key)
        ax.plot(xs, ys, lw=1, label=key, marker="o" if len(xs) < 3 else None)
        if key in OVERLAYS:
            vx, vy = _series(records, OVERLAYS[key])
            if vx:
                ax.plot(vx, vy, "o-", label=OVERLAYS[key])
            ax.legend()
        ax.set_title(TITLES.get(key, key), fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(shown) :]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def bars(
    labels: list[str], values: list[float], path: Path, *, title: str, xlabel: str
) -> Path | None:
    """Horizontal bars, first label on top (the data funnel, time per stage)."""
    if not labels:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(labels) + 1.2))
    ax.barh(range(len(labels)), values, color="tab:blue")
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:,.0f}" if v >= 10 else f" {v:.2f}", va="center", fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
