"""training/run/schedule.py: the learning-rate schedule, a pure function of the step (or of the clock)."""

from __future__ import annotations

import math

import pytest

from training.run.arguments import LoopArguments
from training.run.schedule import describe_schedule, lr_at_step, lr_factor

SCHEDULE = dict(max_lr=1e-3, min_lr=1e-4, warmup_steps=10, total_steps=110)


def test_warmup_is_linear_and_starts_above_zero():
    lrs = [lr_at_step(s, **SCHEDULE) for s in range(10)]
    assert lrs[0] == pytest.approx(1e-4)  # max_lr / warmup_steps: the first update already moves
    assert lrs[9] == pytest.approx(1e-3)
    assert all(b - a == pytest.approx(1e-4) for a, b in zip(lrs, lrs[1:], strict=False))


def test_cosine_midpoint_end_and_floor():
    assert lr_at_step(10, **SCHEDULE) == pytest.approx(1e-3)
    # Halfway through the decay the cosine term is 0: exactly the mean of max and min.
    assert lr_at_step(60, **SCHEDULE) == pytest.approx(5.5e-4)
    assert lr_at_step(35, **SCHEDULE) == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi / 4)))
    assert lr_at_step(110, **SCHEDULE) == 1e-4
    assert lr_at_step(10_000, **SCHEDULE) == 1e-4


def test_decay_is_monotone_after_warmup():
    lrs = [lr_at_step(s, **SCHEDULE) for s in range(10, 120)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))
    assert lrs[0] > lrs[-1]


def test_no_warmup_and_fractional_total():
    assert lr_at_step(0, max_lr=1.0, min_lr=0.0, warmup_steps=0, total_steps=100) == 1.0
    # A time-budgeted run passes an estimated, fractional total.
    assert lr_at_step(50, max_lr=1.0, min_lr=0.0, warmup_steps=0, total_steps=100.5) == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 50 / 100.5))
    )


def test_loop_schedule_by_steps_or_by_time():
    """The loop's factor on each group's peak: 1 at the peak, min / max at the floor."""
    by_steps = LoopArguments(output_dir="x", learning_rate=1e-3, min_learning_rate=1e-4, warmup_steps=10, max_steps=110)
    assert [1e-3 * lr_factor(by_steps, s, elapsed_seconds=999.0) for s in (0, 60, 110)] == pytest.approx(
        [lr_at_step(s, **SCHEDULE) for s in (0, 60, 110)], rel=1e-12
    )  # the clock plays no part
    by_time = LoopArguments(
        output_dir="x",
        learning_rate=1e-3,
        min_learning_rate=1e-4,
        warmup_steps=10,
        max_steps=10**9,
        max_time_seconds=100.0,
    )
    assert lr_factor(by_time, 4, elapsed_seconds=50.0) == pytest.approx(0.5)  # warmup counts steps
    assert lr_factor(by_time, 500, elapsed_seconds=50.0) == pytest.approx(0.55)  # half the budget: midpoint
    assert lr_factor(by_time, 10**6, elapsed_seconds=100.0) == pytest.approx(0.1)
    lrs = [lr_factor(by_time, 10 + t, elapsed_seconds=float(t)) for t in range(101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


def test_every_group_decays_to_the_same_fraction_of_its_own_peak():
    args = LoopArguments(output_dir="x", learning_rate=2e-3, min_learning_rate=2e-4, warmup_steps=0, max_steps=10)
    assert lr_factor(args, 0, 0.0) == 1.0 and lr_factor(args, 10, 0.0) == pytest.approx(0.1)


def test_the_model_card_names_both_optimizers_of_a_muon_run():
    muon = LoopArguments(
        output_dir="x", optimizer="muon", muon_learning_rate=0.02, learning_rate=3e-3, min_learning_rate=3e-4
    )
    text = describe_schedule(muon, num_processes=1)
    assert text.startswith("Muon (peak lr 0.02, weight decay 0.1) for the matrices inside the blocks, AdamW (peak lr")
    assert "cosine decay to 10% of the peak" in text
    assert describe_schedule(LoopArguments(output_dir="x"), 1).startswith("AdamW (peak lr 0.001, betas 0.9, 0.95")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_lr=1e-4, min_lr=1e-3, warmup_steps=1, total_steps=10), "min_lr <= max_lr"),
        (dict(max_lr=1e-3, min_lr=0.0, warmup_steps=-1, total_steps=10), "warmup_steps >= 0"),
        (dict(max_lr=1e-3, min_lr=0.0, warmup_steps=1, total_steps=0), "total_steps > 0"),
    ],
)
def test_bad_schedule_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lr_at_step(0, **kwargs)
