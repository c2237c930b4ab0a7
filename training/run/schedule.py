"""Learning-rate schedule: linear warmup, then cosine decay to a floor, by steps or by the clock.

`lr_at_step` is the curve; `lr_factor` is what a run's settings make of it (by step count, or
over a wall-clock budget), as a factor on each parameter group's peak learning rate;
`describe_schedule` says it in words for the model card. A pure function of the step (no
scheduler object with hidden state), so a resumed run gets exactly the learning rate an
uninterrupted one would, and a test can check any point directly.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from training.run.arguments import LoopArguments


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


def lr_factor(args: LoopArguments, step: int, elapsed_seconds: float) -> float:
    """What the schedule of `args` multiplies each parameter group's peak learning rate by at
    optimizer step `step` (0-based): 1 at the peak, min_learning_rate / learning_rate at the floor.

    One factor for every group, so groups with their own peaks (Muon's matrices and AdamW's
    embeddings) warm up and decay together, each to the same fraction of its peak.

    Step-based runs: warmup, then cosine over `max_steps`. Time-budgeted runs: the same warmup
    in steps, then cosine over the wall-clock budget (progress = elapsed / budget, counted from
    the start, so the short warmup overlaps the first percent or so of the decay). Time is
    monotone, so the learning rate never rises again, and it reaches the floor exactly when
    the budget runs out, whatever the machine's speed.
    """
    schedule = dict(max_lr=1.0, min_lr=floor_fraction(args))
    if args.max_time_seconds is None:
        return lr_at_step(step, **schedule, warmup_steps=args.warmup_steps, total_steps=args.max_steps)
    if step < args.warmup_steps:
        return lr_at_step(step, **schedule, warmup_steps=args.warmup_steps, total_steps=math.inf)
    return lr_at_step(elapsed_seconds, **schedule, warmup_steps=0, total_steps=args.max_time_seconds)


def floor_fraction(args: LoopArguments) -> float:
    """The floor of the decay as a fraction of the peak: min_learning_rate / learning_rate."""
    return args.min_learning_rate / args.learning_rate if args.learning_rate > 0 else 0.0


def describe_schedule(args: LoopArguments, num_processes: int, tokens_per_sequence: int | None = None) -> str:
    """The optimisation in words, for the model card."""
    length = f"{args.max_steps} steps" if args.max_time_seconds is None else f"a {args.max_time_seconds:g} s budget"
    adamw = (
        f"AdamW (peak lr {args.learning_rate:g}, betas {args.adam_beta1}, {args.adam_beta2}, "
        f"weight decay {args.weight_decay}"
    )
    if args.optimizer == "muon":
        optimizer = (
            f"Muon (peak lr {args.muon_learning_rate:g}, weight decay {args.weight_decay}) for the matrices inside "
            f"the blocks, {adamw} on the embeddings and head) for the rest"
        )
    else:
        optimizer = f"{adamw} on matrices)"
    return (
        f"{optimizer}; {args.warmup_steps} warmup steps, cosine decay to {floor_fraction(args):.0%} of the peak "
        f"over {length}; batches of {args.per_device_batch_size} x {args.gradient_accumulation_steps} "
        f"accumulation x {num_processes} process(es)"
        + (f" x {tokens_per_sequence} tokens" if tokens_per_sequence else "")
    )
