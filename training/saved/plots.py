"""Loss curves from metrics.jsonl records: training and validation loss against tokens seen."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from modeling_minigpt.files import pyplot

if TYPE_CHECKING:
    from matplotlib.figure import Figure

LOSS_CURVE_DPI = 110


def loss_curve_figure(
    records: Iterable[Mapping[str, Any]],
    train_key: str = "train_loss",
    val_key: str = "val_loss",
    title: str | None = None,
) -> Figure:
    """`train_key` and `val_key` (nats per token) against the records' "tokens".

    Records without a key are skipped for that curve, so one JSONL file holding both training and
    evaluation entries plots directly. Tokens rather than steps on the x-axis, so runs with
    different batch sizes or process counts line up. Save with `save_figure(fig, path, dpi=LOSS_CURVE_DPI)`.
    """
    records = list(records)
    fig, ax = pyplot().subplots(figsize=(7, 4.2))
    for key, style in ((train_key, {"lw": 1.0, "alpha": 0.8}), (val_key, {"lw": 1.8, "marker": "o", "ms": 3})):
        points = [(r["tokens"], r[key]) for r in records if key in r and "tokens" in r]
        if points:
            ax.plot(*zip(*points, strict=True), label=key.replace("_", " "), **style)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title or "Loss")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    return fig


# panel title -> (y-axis label, [(metrics.jsonl key, legend label)]) of the DPO curves
PREFERENCE_PANELS: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "DPO loss": ("loss per pair", [("train_loss", "train"), ("val_loss", "held-out")]),
    "Held-out rewards (β · log-ratio)": (
        "reward",
        [("val_reward_margin", "margin"), ("val_rewards_chosen", "chosen"), ("val_rewards_rejected", "rejected")],
    ),
    "Held-out reward accuracy": (
        "fraction of pairs",
        [("val_reward_accuracy", "chosen > rejected"), ("val_exact_match", "greedy answer = chosen")],
    ),
    "Held-out policy log-probabilities": (
        "log-probability",
        [("val_logps_chosen", "chosen"), ("val_logps_rejected", "rejected")],
    ),
}


def preference_curves_figure(records: Iterable[Mapping[str, Any]], title: str | None = None) -> Figure:
    """Preference tuning at a glance, against tokens seen: the DPO loss, the held-out rewards and
    their margin, the reward accuracy, and the policy's log-probabilities of both responses
    (the "both fall" failure shows there). Save with `save_figure(fig, path, dpi=LOSS_CURVE_DPI)`."""
    records = list(records)
    fig, axes = pyplot().subplots(2, 2, figsize=(11, 7), sharex=True)
    for ax, (panel, (ylabel, keys)) in zip(axes.flat, PREFERENCE_PANELS.items(), strict=True):
        for key, label in keys:
            points = [(r["tokens"], r[key]) for r in records if key in r and "tokens" in r]
            if points:
                style = {"lw": 1.0, "alpha": 0.8} if key == "train_loss" else {"lw": 1.6, "marker": "o", "ms": 3}
                ax.plot(*zip(*points, strict=True), label=label, **style)
        ax.set_title(panel, fontsize=10)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("tokens seen")
    fig.suptitle(title or "Preference tuning (DPO)")
    fig.tight_layout()
    return fig
