"""Learning-rate schedule: linear warmup, then cosine decay to a floor.

A pure function of the step (no scheduler object with hidden state), so a resumed run gets
exactly the learning rate an uninterrupted one would, and a test can check any point directly.
"""

from __future__ import annotations

import math


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
