"""The optimizers: AdamW with weight-decay groups, or Muon on the hidden matrices plus AdamW on the rest,
as one optimizer that the loop, `accelerator.prepare` and checkpoints see as a plain Optimizer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from training.run.arguments import LoopArguments


def build_optimizer(
    model: torch.nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.95),
    fused: bool = False,
) -> torch.optim.AdamW:
    """AdamW that decays matrices (weights of linear and embedding layers) but not biases or norms.

    Decaying LayerNorm gains or biases pulls them toward 0 for no regularising benefit (nanoGPT,
    GPT-2/3). Tied weights appear once (`parameters()` de-duplicates shared tensors); frozen
    parameters are left out. `fused`: one CUDA kernel for the whole update (`use_fused_adamw`).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(_decay_groups(params, lr, weight_decay), betas=betas, fused=fused or None)


def use_fused_adamw(device: torch.device | None) -> bool:
    """Fused AdamW on CUDA (one kernel for all parameters instead of a few per tensor list; nanoGPT's
    choice); elsewhere torch's default (foreach), so CPU runs keep the numbers they always had."""
    return device is not None and device.type == "cuda"


def _decay_groups(params: list[torch.nn.Parameter], lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW's two groups: matrices decayed, vectors (biases, norms) not. `initial_lr` is the
    group's peak learning rate, which the schedule scales (`train_loop`)."""
    peak = {"lr": lr, "initial_lr": lr}
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay, **peak},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, **peak},
    ]


def hidden_matrices(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable 2-D weights inside the model's repeated blocks: what Muon is for.

    Hugging Face models name their block class in `_no_split_modules` (MiniGPT: TransformerBlock);
    that tells the hidden matrices (attention and MLP projections, hidden state to hidden state)
    apart from the embeddings and the head, which map tokens in and out and suit AdamW better
    (Keller Jordan, "Muon: An optimizer for hidden layers in neural networks", 2024).
    """
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    if not blocks:
        raise ValueError(
            f"--optimizer muon needs a model that names its repeated blocks in `_no_split_modules`; "
            f"{type(model).__name__} does not: use --optimizer adamw"
        )
    hidden: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        if type(module).__name__ in blocks:
            hidden.update({id(p): p for p in module.parameters() if p.requires_grad and p.dim() == 2})
    return list(hidden.values())


class MuonWithAdamW(torch.optim.Optimizer):
    """torch.optim.Muon for the hidden matrices and AdamW for the rest, as ONE optimizer.

    The loop, `accelerator.prepare`, checkpoints and the schedule see a plain Optimizer: one list
    of param_groups (Muon's first; each keeps its own `lr` and `initial_lr`), one `state` keyed by
    parameter, and the standard state_dict (parameters numbered over all groups; plain tensors,
    numbers and tuples, which `torch.load(weights_only=True)` reads). The two parts share these
    group dicts and this state, so nothing needs syncing; `load_state_dict` re-links them after
    torch has replaced both.
    """

    def __init__(
        self,
        muon_groups: list[dict[str, Any]],
        adamw_groups: list[dict[str, Any]],
        *,
        betas: tuple[float, float] = (0.9, 0.95),
        fused: bool = False,
    ):
        self.muon = torch.optim.Muon(muon_groups)
        self.adamw = torch.optim.AdamW(adamw_groups, betas=betas, fused=fused or None)
        # add_param_group keeps each group dict as given: these are the parts' own dicts.
        super().__init__([*self.muon.param_groups, *self.adamw.param_groups], defaults={})
        self._link()

    def _link(self) -> None:
        split = len(self.muon.param_groups)
        self.muon.param_groups, self.adamw.param_groups = self.param_groups[:split], self.param_groups[split:]
        self.muon.state = self.adamw.state = self.state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._link()

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss


def build_muon_optimizer(
    model: torch.nn.Module,
    lr: float,
    muon_lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.95),
    fused: bool = False,
) -> MuonWithAdamW:
    """Muon (at `muon_lr`, decoupled weight decay) on `hidden_matrices(model)`; AdamW (at `lr`, the
    groups of `build_optimizer`) on every other trainable parameter.

    Muon keeps torch's defaults: momentum 0.95 with Nesterov, 5 Newton-Schulz steps (run in bf16
    by torch), and the update scaled by sqrt(max(1, rows / columns)).
    """
    hidden = hidden_matrices(model)
    if not hidden:
        raise ValueError("--optimizer muon: the model has no trainable 2-D weights inside its blocks")
    ids = {id(p) for p in hidden}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    muon = [{"params": hidden, "lr": muon_lr, "weight_decay": weight_decay, "initial_lr": muon_lr}]
    return MuonWithAdamW(muon, _decay_groups(rest, lr, weight_decay), betas=betas, fused=fused)


def make_optimizer(
    model: torch.nn.Module, args: LoopArguments, device: torch.device | None = None
) -> torch.optim.Optimizer:
    """The optimizer `args` asks for, over the model's trainable parameters; AdamW fused on a CUDA
    `device` (the run's, where the parameters will live: `use_fused_adamw`)."""
    betas, fused = (args.adam_beta1, args.adam_beta2), use_fused_adamw(device)
    if args.optimizer == "muon":
        return build_muon_optimizer(
            model, args.learning_rate, args.muon_learning_rate, args.weight_decay, betas, fused=fused
        )
    return build_optimizer(model, args.learning_rate, args.weight_decay, betas, fused=fused)


def describe_optimizer(args: LoopArguments, device: torch.device | None) -> str:
    """The optimizer in words, as the run prints it."""
    adamw = "AdamW (fused CUDA kernel)" if use_fused_adamw(device) else "AdamW (torch's default foreach kernels)"
    return f"Muon on the hidden matrices + {adamw} on the rest" if args.optimizer == "muon" else adamw
