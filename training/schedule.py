"""Learning-rate schedule: linear warmup, then cosine decay to a floor, by steps or by the clock.

`lr_at_step` is the curve; `learning_rate` is what a run's settings make of it (by step count,
or over a wall-clock budget); `describe_schedule` says it in words for the model card. A pure
function of the step (no scheduler object with hidden state), so a resumed run gets exactly the
learning rate an uninterrupted one would, and a test can check any point directly.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from training.loop import LoopArguments


def lr_at_step(step: float, *, max_lr: float, min_lr: float, warmup_steps: int, total_steps: float) -> float:
    """Learning rate for optimizer step `step` (0-based: the first update uses step 0).

    Warmup rises linearly from max_lr / warmup_steps at step 0 to max_lr at step warmup_steps - 1,
    so even the first update moves the weights (nanoGPT's choice). Afterwards a half cosine goes
    from max_lr at `warmup_steps` to min_lr at `total_steps`, and min_lr holds beyond.
    `step` and `total_steps` may be fractional: a time-budgeted run passes an estimated total.
    """
    if not 0.0 <= min_lr <= max_lr:
        raise ValueError(f"need 0 <= min_lr <= max_lr, got min_lr={min_lr}, max_lr={max_lr}")
    if warmup_steps < 0 or total_steps <= 0:
        raise ValueError(f"need warmup_steps >= 0 and total_steps > 0, got {warmup_steps} and {total_steps}")
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1e-12)  # in [0, 1)
    return min_lr + 0.5 * (max_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def learning_rate(args: LoopArguments, step: int, elapsed_seconds: float) -> float:
    """The schedule of `args` at optimizer step `step` (0-based).

    Step-based runs: warmup, then cosine over `max_steps`. Time-budgeted runs: the same warmup
    in steps, then cosine over the wall-clock budget (progress = elapsed / budget, counted from
    the start, so the short warmup overlaps the first percent or so of the decay). Time is
    monotone, so the learning rate never rises again, and it reaches the floor exactly when
    the budget runs out, whatever the machine's speed.
    """
    schedule = dict(max_lr=args.learning_rate, min_lr=args.min_learning_rate)
    if args.max_time_seconds is None:
        return lr_at_step(step, **schedule, warmup_steps=args.warmup_steps, total_steps=args.max_steps)
    if step < args.warmup_steps:
        return lr_at_step(step, **schedule, warmup_steps=args.warmup_steps, total_steps=math.inf)
    return lr_at_step(elapsed_seconds, **schedule, warmup_steps=0, total_steps=args.max_time_seconds)


def describe_schedule(loop_args: LoopArguments, num_processes: int, tokens_per_sequence: int | None = None) -> str:
    """The optimisation in words, for the model card."""
    length = (
        f"{loop_args.max_steps} steps"
        if loop_args.max_time_seconds is None
        else f"a {loop_args.max_time_seconds:g} s budget"
    )
    return (
        f"AdamW (betas {loop_args.adam_beta1}, {loop_args.adam_beta2}; "
        f"weight decay {loop_args.weight_decay} on matrices), "
        f"lr {loop_args.learning_rate:g} after {loop_args.warmup_steps} warmup steps, cosine decay to "
        f"{loop_args.min_learning_rate:g} over {length}; batches of {loop_args.per_device_batch_size} x "
        f"{loop_args.gradient_accumulation_steps} accumulation x {num_processes} process(es)"
        + (f" x {tokens_per_sequence} tokens" if tokens_per_sequence else "")
    )
