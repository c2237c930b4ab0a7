"""training/saved/plots.py: the loss curve draws each loss of metrics.jsonl against the tokens seen."""

from __future__ import annotations

from modeling_minigpt.files import pyplot
from training.saved.plots import loss_curve_figure


def test_the_loss_curve_draws_training_and_validation_loss_against_tokens():
    records = [
        {"step": 1, "tokens": 100, "train_loss": 5.0, "lr": 1e-3},
        {"step": 2, "tokens": 200, "train_loss": 4.0, "lr": 1e-3},
        {"step": 2, "tokens": 200, "val_loss": 4.5, "sample": "text"},
    ]
    figure = loss_curve_figure(records, title="Pretraining run")
    lines = {line.get_label(): line.get_xydata().tolist() for line in figure.axes[0].get_lines()}
    assert lines == {"train loss": [[100.0, 5.0], [200.0, 4.0]], "val loss": [[200.0, 4.5]]}
    assert figure.axes[0].get_title() == "Pretraining run"
    pyplot().close(figure)
