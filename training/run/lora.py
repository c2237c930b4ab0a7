"""LoRA through PEFT: wrap a MiniGPT model with adapters (saved and merged by `training.saved.save`).

LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685) freezes the pretrained weights and
learns a low-rank update `W + (alpha / r) * B @ A` for chosen linear layers. Only A and B (and,
for classification, the new head) are trained, so the optimizer state is tiny and the adapter
file is a few hundred kilobytes. After training the update is added into W (`merge_lora`), which
gives back a plain MiniGPT model that loads without PEFT.

MiniGPT's linear layers, by module name: attention `W_query`, `W_key`, `W_value`, `out_proj`;
feed-forward `fc_in`, `fc_out`. The default targets all six (the QLoRA paper found adapting every
linear layer matters more than the rank); the output head is never a target because it is tied
to the token embedding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from transformers import PreTrainedModel

if TYPE_CHECKING:
    from peft import PeftModel

DEFAULT_TARGET_MODULES: tuple[str, ...] = ("W_query", "W_key", "W_value", "out_proj", "fc_in", "fc_out")


@dataclass
class LoraArguments:
    """LoRA settings; used only when the job's fine-tuning mode is "lora"."""

    lora_r: int = field(default=8, metadata={"help": "Rank of the low-rank update (default: 8)."})
    lora_alpha: float = field(
        default=16.0, metadata={"help": "Scale: the update is multiplied by alpha / r (default: 16)."}
    )
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the adapter's input (default: 0.05)."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(DEFAULT_TARGET_MODULES),
        metadata={
            "help": "Linear layers to adapt, by module name (default: W_query W_key W_value out_proj fc_in fc_out)."
        },
    )

    def __post_init__(self) -> None:
        if self.lora_r < 1:
            raise ValueError(f"--lora_r must be >= 1, got {self.lora_r}")
        if self.lora_alpha <= 0:
            raise ValueError(f"--lora_alpha must be > 0, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.lora_target_modules:
            raise ValueError("--lora_target_modules is empty: name at least one linear layer")


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """The distinct last names of the model's linear layers (what `target_modules` matches)."""
    return sorted(
        {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    )


def apply_lora(
    model: PreTrainedModel, args: LoraArguments, task_type: Literal["CAUSAL_LM", "SEQ_CLS"] = "CAUSAL_LM"
) -> PeftModel:
    """`model` wrapped with LoRA adapters on `args.lora_target_modules`; only adapters train.

    With task_type "SEQ_CLS" PEFT also trains (a copy of) the classification head, which it
    finds by its name `score`. Raises ValueError naming the linear layers that exist when a
    target matches none.
    """
    from peft import LoraConfig, get_peft_model  # imported on use: peft alone takes seconds to import

    available = linear_module_names(model)
    unknown = [name for name in args.lora_target_modules if name not in available]
    if unknown:
        raise ValueError(
            f"LoRA target modules {unknown} are not linear layers of this model; its linear layers are {available}"
        )
    config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=list(args.lora_target_modules),
        task_type=task_type,
    )
    return get_peft_model(model, config)


def trainable_parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, shared tensors counted once."""
    params = list(model.parameters())  # de-duplicates tied weights
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
