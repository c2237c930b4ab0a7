"""Accelerate's DeepSpeed ZeRO-2 and ZeRO-3 (`--config_file scripts/configs/accelerate/deepspeed_zero{2,3}.yaml`)
in the training jobs: their settings taken from the script's flags, and their state gathered by parameter name.

DeepSpeed keeps the training state in its own form: ZeRO flattens each optimizer group's fp32
master weights into one vector and gives each rank a slice of it, with the AdamW moments of that
slice (ZeRO-3 slices the model's parameters too). `full_training_state` reassembles them, one
parameter at a time, into whole tensors keyed by parameter name — the model state dict and the
torch AdamW state a one-process run saves (`get_optimizer_state_dict(..., full_state_dict=True)`)
— so a DeepSpeed run writes the same checkpoint files as any other run (`training.run.checkpoint`)
and `load_full_training_state` scatters them back into the slices on resume. DeepSpeed's own
(pickled, per-rank) checkpoint format is not used.

The reassembly uses DeepSpeed's `safe_get_full_fp32_param` / `safe_get_full_optimizer_state` (and
their `safe_set_` inverses), which find each parameter's place in the flat slices for stage 1, 2
and 3. Each is a collective (an all-reduce or all-gather over the ranks): every rank calls them,
in the same order.
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

from training.run.arguments import LoopArguments

# The AdamW moments, under torch's names (DeepSpeed's torch AdamW keeps them so).
MOMENTS = ("exp_avg", "exp_avg_sq")


def is_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def zero_stage(accelerator: Accelerator) -> int:
    return int(accelerator.state.deepspeed_plugin.zero_stage)


def check_deepspeed(accelerator: Accelerator, args: LoopArguments) -> None:
    """Refuse (ValueError) what this module does not gather, before anything is written."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin.zero_stage not in (2, 3):
        raise ValueError(
            f"DeepSpeed ZeRO stage {plugin.zero_stage} is not supported by the checkpoints: "
            "use deepspeed_zero2.yaml or deepspeed_zero3.yaml"
        )
    offload = [
        what
        for what, key in (("optimizer", "offload_optimizer"), ("parameters", "offload_param"))
        if plugin.deepspeed_config["zero_optimization"].get(key, {}).get("device", "none") not in ("none", None)
    ]
    if offload:
        raise ValueError(
            f"DeepSpeed's offload of the {' and '.join(offload)} to CPU/NVMe is not supported by the checkpoints: set "
            "offload_optimizer_device/offload_param_device: none, or use scripts/configs/accelerate/fsdp2.yaml"
        )
    if args.optimizer != "adamw":
        raise ValueError(
            f"--optimizer {args.optimizer} does not run under DeepSpeed (ZeRO flattens the weight matrices Muon "
            "orthogonalises): use --optimizer adamw, or scripts/configs/accelerate/fsdp2.yaml / ddp.yaml"
        )


def configure_deepspeed(accelerator: Accelerator, args: LoopArguments) -> str:
    """Put the script's batch, accumulation and clipping into DeepSpeed's config, which runs them
    itself (in `accelerator.backward`); call it before `accelerator.prepare`. The script's flags win
    over the Accelerate config file's values. Returns a line saying what runs."""
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = args.per_device_batch_size
    config["gradient_accumulation_steps"] = args.gradient_accumulation_steps
    steps = args.gradient_accumulation_steps
    config["train_batch_size"] = args.per_device_batch_size * steps * accelerator.num_processes
    config["gradient_clipping"] = args.max_grad_norm if args.max_grad_norm > 0 else 0.0  # 0: DeepSpeed does not clip
    return (
        f"DeepSpeed ZeRO-{zero_stage(accelerator)} over {accelerator.num_processes} processes (accumulation "
        f"{args.gradient_accumulation_steps}, clipping {config['gradient_clipping']} from this script's flags)"
    )


def _zero_optimizer(optimizer: Any) -> Any:
    """DeepSpeed's ZeRO optimizer inside Accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def _named_groups(model: nn.Module, zero: Any) -> list[list[tuple[str, nn.Parameter]]]:
    """The trainable parameters of each optimizer group, by name, in DeepSpeed's order."""
    groups = zero.bit16_groups if hasattr(zero, "bit16_groups") else zero.fp16_groups  # ZeRO-2 / ZeRO-3
    names = {id(param): name for name, param in model.named_parameters()}
    return [[(names[id(param)], param) for param in group] for group in groups]


def full_training_state(model: nn.Module, optimizer: Any, is_main: bool) -> tuple[dict, dict]:
    """(model state dict, torch AdamW state dict), whole tensors by parameter name, on the main
    process (the others get ({}, {})). A collective: every rank calls it. `model` is the unwrapped
    module, `optimizer` what `accelerator.prepare` returned. The weights are DeepSpeed's fp32
    master copies (`full_model_state`)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    zero = _zero_optimizer(optimizer)
    base = zero.optimizer  # the torch AdamW over DeepSpeed's flat slices
    optimizer_state: dict[str, dict[str, torch.Tensor]] = {}
    param_groups = []
    stepped = all(zero.optimizer.state.get(flat) for flat in _flat_slices(zero))  # AdamW's state starts at step 1
    if stepped:
        _link_moments(zero)
        step = _step(zero)
    for group, named in zip(base.param_groups, _named_groups(model, zero), strict=True):
        for name, param in named:
            if stepped:
                moments = {key: safe_get_full_optimizer_state(param, key).detach().cpu() for key in MOMENTS}
                optimizer_state[name] = {"step": step.clone(), **moments}
        param_groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": [n for n, _ in named]})
    model_state = full_model_state(model, optimizer, is_main)
    if not is_main:
        return {}, {}
    return model_state, {"state": optimizer_state, "param_groups": param_groups}


def full_model_state(model: nn.Module, optimizer: Any, is_main: bool) -> dict[str, torch.Tensor]:
    """The model's state dict with DeepSpeed's fp32 master weights, whole, on the main process
    (the others get {}). A collective. Tied weights appear under each of their names."""
    from deepspeed.utils import safe_get_full_fp32_param

    zero = _zero_optimizer(optimizer)
    weights = {
        id(param): safe_get_full_fp32_param(param).detach().cpu()
        for group in _named_groups(model, zero)
        for _, param in group
    }
    if not is_main:
        return {}
    return {
        name: weights[id(tensor)] if id(tensor) in weights else tensor.detach().cpu()
        for name, tensor in model.state_dict(keep_vars=True).items()
    }


def gather_full_model(model: nn.Module, optimizer: Any, is_main: bool) -> nn.Module | None:
    """Main process: a plain copy of the unwrapped `model` on CPU with the whole fp32 weights, for
    `save_pretrained`; other ranks: None. A collective."""
    state = full_model_state(model, optimizer, is_main)
    if not is_main:
        return None
    plain = type(model)(model.config)
    plain.load_state_dict(state, strict=True)
    return plain.eval()


def _flat_slices(zero: Any) -> list[torch.Tensor]:
    """This rank's fp32 slice of each optimizer group: the tensors AdamW's state is keyed by."""
    if hasattr(zero, "single_partition_of_fp32_groups"):  # ZeRO-2
        return list(zero.single_partition_of_fp32_groups)
    return list(zero.fp32_partitioned_groups_flat)  # ZeRO-3


def _link_moments(zero: Any) -> None:
    """ZeRO-2: point each parameter's view into the AdamW moments of its slice, which the `safe_*`
    functions read and write. DeepSpeed 0.19.8 links them once, right after the FIRST group's first
    step, when the other groups (the parameters without weight decay) have no moments yet, so
    theirs stay unlinked ("exp_avg not found in optimizer state fragment"); linking again fixes
    that. ZeRO-3 reads the moments directly."""
    if hasattr(zero, "_hp_optimizer_states_linked"):
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()


def _step(zero: Any) -> torch.Tensor:
    """AdamW's step count: the same for every flat slice, as every parameter is updated at every step."""
    steps = {float(zero.optimizer.state[flat]["step"]) for flat in _flat_slices(zero)}
    if len(steps) != 1:
        raise RuntimeError(f"DeepSpeed's optimizer slices are at different steps: {sorted(steps)}")
    return torch.tensor(steps.pop())


def load_full_training_state(model: nn.Module, optimizer: Any, model_state: dict, optimizer_state: dict) -> None:
    """Put the states of `full_training_state` (read on every rank) back into DeepSpeed's slices and
    the module's weights. A collective for ZeRO-3 (each parameter is gathered to be overwritten)."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    zero = _zero_optimizer(optimizer)
    base = zero.optimizer
    named = [pair for group in _named_groups(model, zero) for pair in group]
    missing = sorted({name for name, _ in named} - set(model_state))
    if missing:
        raise KeyError(f"the checkpoint's model state lacks {missing}")
    state = optimizer_state.get("state", {})
    if state:
        # AdamW creates its moments at the first step; a fresh run has none to copy into yet.
        for flat in _flat_slices(zero):
            base.state[flat] = {"step": torch.zeros(()), **{key: torch.zeros_like(flat) for key in MOMENTS}}
        _link_moments(zero)
    for name, param in named:
        value = model_state[name].to(param.device, torch.float32)
        safe_set_full_fp32_param(param, value)
        # The module's own (working) copy: whole on every rank under ZeRO-2, a slice under ZeRO-3.
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0, enabled=hasattr(param, "ds_id")):
            param.data.copy_(value.to(param.dtype))
        if state:
            entry = state[name]
            for key in MOMENTS:
                safe_set_full_optimizer_state(param, entry[key].to(param.device), key)
    if state:
        step = next(iter(state.values()))["step"]
        for flat in _flat_slices(zero):
            base.state[flat]["step"] = step.clone().to(torch.float32)
    buffers = {name: tensor for name, tensor in model.named_buffers()}
    for name, tensor in model_state.items():
        if name in buffers:
            buffers[name].copy_(tensor)


def stop_building_partitioned() -> None:
    """Make transformers build models whole again, once training is over. Under ZeRO-3 Accelerate
    registers DeepSpeed's config with transformers, whose `from_config`/`from_pretrained` then build
    every model partitioned over the ranks (a collective): the main process alone, writing the final
    folder (the model card builds the model to count its parameters), would wait for the others forever."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
