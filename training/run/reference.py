"""The reference model of the jobs that tune against one (DPO, GRPO), and dropout switched off.

A job scores its batches with a `score(model, batch)` function of its own (DPO: summed response
log-probabilities; GRPO: per-token log-probabilities of sampled completions); the reference runs
the same function on the untuned model:

- `FrozenCopy`: full fine-tuning: a copy of the base model, frozen, in eval mode;
- `DisabledAdapter`: LoRA: the policy itself with its adapter disabled (no second copy).

Both run under the policy's autocast, so that an untouched policy and its reference agree to
the bit at step 0 (with bf16 a frozen copy run in fp32 would not).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Mapping

import torch
from accelerate import Accelerator

Batch = Mapping[str, torch.Tensor]
Score = Callable[[torch.nn.Module, Batch], torch.Tensor]


class FrozenCopy:
    """The reference of full fine-tuning: a copy of the base model, frozen, in eval mode."""

    def __init__(
        self,
        model: torch.nn.Module,
        device: torch.device,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        *,
        score: Score,
    ):
        self.model = copy.deepcopy(model).requires_grad_(False).eval().to(device)
        self.score = score
        self.autocast = autocast  # the policy's (`Accelerator.autocast`)

    @torch.no_grad()
    def __call__(self, policy: torch.nn.Module, batch: Batch) -> torch.Tensor:
        with self.autocast():
            return self.score(self.model, batch)


class DisabledAdapter:
    """The reference of LoRA: the policy itself with its adapter disabled (PEFT's `disable_adapter`),
    so no second copy of the model is held. Run on the unwrapped model: the DDP wrapper is for the
    policy's forward, whose gradients it synchronises."""

    def __init__(self, accelerator: Accelerator, *, score: Score):
        self.accelerator = accelerator
        self.score = score

    @torch.no_grad()
    def __call__(self, policy: torch.nn.Module, batch: Batch) -> torch.Tensor:
        peft_model = self.accelerator.unwrap_model(policy)
        with peft_model.disable_adapter(), self.accelerator.autocast():
            return self.score(peft_model, batch)


def disable_dropout(model: torch.nn.Module) -> Callable[[], None]:
    """Switch every dropout off (the modules, and the config rate MiniGPT's sdpa path reads);
    returns the function that restores them, so the saved config keeps the base's rate.

    A policy tuned against a reference runs without dropout (TRL's default): with it the policy
    would differ from the reference at step 0, and every log-ratio would carry its noise."""
    modules = [(m, m.p) for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    config = model.config
    config_rate = getattr(config, "drop_rate", None)
    for module, _ in modules:
        module.p = 0.0
    if config_rate is not None:
        config.drop_rate = 0.0

    def restore() -> None:
        for module, p in modules:
            module.p = p
        if config_rate is not None:
            config.drop_rate = config_rate

    return restore
