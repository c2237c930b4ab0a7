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
    return panels_figure(records, PREFERENCE_PANELS, "tokens", title or "Preference tuning (DPO)")


# panel title -> (y-axis label, [(metrics.jsonl key, legend label)]) of the GRPO curves
GRPO_PANELS: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "Reward of the sampled completions": ("reward", [("reward", "mean"), ("reward_std", "std")]),
    "Held-out exact match (greedy)": ("fraction of prompts", [("val_exact_match", "all kinds")]),
    "KL to the reference, groups without signal": (
        "nats / token; fraction",
        [("kl", "KL (per token)"), ("frac_reward_zero_std", "groups with all-equal rewards")],
    ),
    "Completions": ("tokens; fraction", [("completion_length", "length (tokens)"), ("stopped", "ended with eos")]),
}


def grpo_curves_figure(records: Iterable[Mapping[str, Any]], title: str | None = None) -> Figure:
    """GRPO at a glance, against optimizer steps: the sampled completions' reward (mean, std), the
    held-out exact match (overall and per task kind), the KL to the reference and the share of
    groups whose rewards are all equal (they give no gradient), and the completion length."""
    records = list(records)
    kinds = sorted({k for r in records for k in r if k.startswith("exact_match_")})
    panels = dict(GRPO_PANELS)
    label, keys = panels["Held-out exact match (greedy)"]
    panels["Held-out exact match (greedy)"] = (label, keys + [(k, k.removeprefix("exact_match_")) for k in kinds])
    return panels_figure(records, panels, "step", title or "GRPO")


def panels_figure(
    records: Iterable[Mapping[str, Any]],
    panels: Mapping[str, tuple[str, list[tuple[str, str]]]],
    x_key: str,
    title: str,
) -> Figure:
    """Four panels of metrics.jsonl curves against `x_key` ("tokens" or "step"); records without a
    key are skipped for its curve. Evaluations (val_*, exact_match_*) are drawn with markers."""
    records = list(records)
    fig, axes = pyplot().subplots(2, 2, figsize=(11, 7), sharex=True)
    for ax, (panel, (ylabel, keys)) in zip(axes.flat, panels.items(), strict=True):
        for key, label in keys:
            points = [(r[x_key], r[key]) for r in records if key in r and x_key in r]
            if points:
                evaluated = key.startswith(("val_", "exact_match_"))
                style = {"lw": 1.6, "marker": "o", "ms": 3} if evaluated else {"lw": 1.0, "alpha": 0.8}
                ax.plot(*zip(*points, strict=True), label=label, **style)
        ax.set_title(panel, fontsize=10)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("tokens seen" if x_key == "tokens" else "optimizer step")
    fig.suptitle(title)
    fig.tight_layout()
    return fig
