"""Loss curves from metrics.jsonl records: training and validation loss against tokens seen."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from training.checkpoint import atomic_path


def plot_loss_curve(
    records: Iterable[Mapping[str, Any]],
    path: str | os.PathLike[str],
    train_key: str = "train_loss",
    val_key: str = "val_loss",
    title: str | None = None,
) -> Path:
    """Save a PNG of `train_key` and `val_key` (nats per token) against the records' "tokens".

    Records without a key are skipped for that curve, so one JSONL file holding both training and
    evaluation entries plots directly. Tokens rather than steps on the x-axis, so runs with
    different batch sizes or process counts line up. Written atomically.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display needed; safe in tests, servers and worker processes
    import matplotlib.pyplot as plt

    records = list(records)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for key, style in ((train_key, {"lw": 1.0, "alpha": 0.8}), (val_key, {"lw": 1.8, "marker": "o", "ms": 3})):
        points = [(r["tokens"], r[key]) for r in records if key in r and "tokens" in r]
        if points:
            ax.plot(*zip(*points), label=key.replace("_", " "), **style)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title or "Loss")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    return Path(path)
