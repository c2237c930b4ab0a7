"""The Accelerator of a run, and the hardware choices made for it at run time (mixed precision,
attention path), each printed with its reason."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import (
    DataLoaderConfiguration,
    GradientAccumulationPlugin,
    ProjectConfiguration,
    parse_flag_from_env,
)

from training.run.arguments import LoopArguments
from training.saved.layout import RunLayout


def resolve_mixed_precision(requested: str, device: torch.device) -> tuple[str, str]:
    """(the autocast mode for Accelerate, why): `requested` itself unless it is "auto".

    auto picks bf16 only where the hardware has bf16 arithmetic. Measured: on a CPU with AVX-512
    BF16 a bf16 matmul ran at 2.25x fp32, while on a CPU with AVX-512 but without BF16 bf16 ran
    ~35x SLOWER than fp32. So it is decided at run time from the CPU's feature flags.
    """
    if requested != "auto":
        return requested, "as requested"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if torch.cuda.is_bf16_supported():
            return "bf16", f"auto: the GPU ({name}) supports bf16"
        return "no", f"auto: the GPU ({name}) has no bf16 support"
    if device.type == "cpu":
        capabilities = torch.cpu.get_capabilities()
        native = [flag for flag in ("amx_bf16", "avx512_bf16") if capabilities.get(flag)]
        if native:
            return "bf16", f"auto: this CPU has native bf16 instructions ({', '.join(native)})"
        return "no", "auto: fp32, this CPU has no native bf16 instructions (avx512_bf16, amx_bf16)"
    return "no", f"auto: fp32 on a {device.type} device (bf16 not measured there)"


# The longest context at which the eager path beat torch's fused kernel for a bf16 forward+backward
# on a CPU with AVX-512 BF16 (`python benchmarks/bench_model.py --attention`, torch 2.13): 1.8x faster
# at 128 and 256 tokens, 1.0-1.4x at 512 (two runs); at 1024 the fused kernel is 2x faster (eager
# keeps every score). In fp32 the fused kernel always wins, so only bf16 switches. A quickstart training step
# (4 x 128, batch 16) runs 1.42x faster than fp32 with bf16 + eager, 0.94x with bf16 + sdpa.
EAGER_BF16_CPU_MAX_CONTEXT = 512


def resolve_attention(
    requested: str, mixed_precision: str, device: torch.device, context_length: int | None
) -> tuple[str, str]:
    """(attn_implementation, why): `requested` itself unless it is "auto".

    auto picks eager only for bf16 autocast on a CPU and a context of at most
    `EAGER_BF16_CPU_MAX_CONTEXT`: there torch's fused CPU attention kernel, the faster one in fp32,
    ran bf16 slower than the plain matmul + softmax and took ~40 % of a small model's training step.
    """
    if requested != "auto":
        return requested, "as requested"
    if device.type != "cpu" or mixed_precision != "bf16":
        return "sdpa", "auto: torch's fused kernel"
    if context_length is None or context_length > EAGER_BF16_CPU_MAX_CONTEXT:
        return "sdpa", f"auto: torch's fused kernel, faster than eager in bf16 past {EAGER_BF16_CPU_MAX_CONTEXT} tokens"
    return "eager", (
        f"auto: bf16 on a CPU with a context of {context_length} <= {EAGER_BF16_CPU_MAX_CONTEXT} tokens, where "
        "torch's fused kernel is slower than the plain matmul + softmax"
    )


def choose_attention(model: torch.nn.Module, args: LoopArguments, accelerator: Accelerator) -> None:
    """Switch `model` to the attention path `resolve_attention` picks for this run, and print it
    (once per model: a job that needs the path early, DPO for its reference, calls this before
    `training.run.lifecycle.prepare` calls it again). Only the run's copy changes: `attn_implementation`
    is not saved with the model."""
    if not hasattr(model, "set_attn_implementation") or getattr(model, "_run_attention", None):
        return
    context_length = getattr(model.config, "context_length", None) or getattr(model.config, "n_positions", None)
    implementation, why = resolve_attention(
        args.attention, accelerator.mixed_precision, accelerator.device, context_length
    )
    if model.config._attn_implementation != implementation:
        model.set_attn_implementation(implementation)
    model._run_attention = implementation
    if accelerator.is_main_process:
        print(f"attention: {implementation} ({why})")


def make_accelerator(args: LoopArguments) -> Accelerator:
    """An Accelerator for `args`; creates no files (trackers start in `start_trackers`).

    The gradient-accumulation counter ignores epoch ends (`sync_with_dataloader=False`) so every
    optimizer step sees exactly `gradient_accumulation_steps` micro-batches, even across epochs.
    The seedable sampler makes the shuffled order a function of (seed, epoch) on every process.
    Mixed precision: `resolve_mixed_precision`, printed by the main process. Accelerate's autocast
    keeps the weights and the optimizer state in fp32 (only matmuls run in bf16).
    """
    # The device this process will run on, made as Accelerator would make it (the launcher's --cpu
    # arrives as ACCELERATE_USE_CPU); a PartialState without it sets up a different distributed backend.
    process = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"), **_deepspeed_cpu_backend())
    mixed_precision, why = resolve_mixed_precision(args.mixed_precision, process.device)
    tf32 = allow_tf32(process.device)
    if process.is_main_process:
        print(f"mixed precision: {'bf16 autocast' if mixed_precision == 'bf16' else mixed_precision} ({why})")
        if tf32:
            print("fp32 matmuls: TF32 tensor cores (10-bit mantissa inputs, fp32 accumulation; ~8x fp32 on Ampere+)")
    return Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=args.gradient_accumulation_steps, sync_with_dataloader=False
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.fspath(RunLayout(Path(args.output_dir)).logs)
        ),
    )


def _deepspeed_cpu_backend() -> dict[str, str]:
    """{"backend": "gloo"} for a DeepSpeed launch on a machine without a GPU, else {}.

    Accelerate 1.16 derives the process group's backend from the GPU it finds; with none it sets no
    backend and then reports ONE process on every rank, while DeepSpeed (its CPU accelerator, gloo
    without oneCCL) runs them all: each rank would see rank 0, read every batch and write the run
    folder. Naming gloo makes Accelerate count the ranks DeepSpeed started."""
    if not parse_flag_from_env("ACCELERATE_USE_DEEPSPEED") or torch.cuda.is_available():
        return {}
    return {"backend": "gloo"}


def allow_tf32(device: torch.device) -> bool:
    """Let CUDA run fp32 matmuls and convolutions on TF32 tensor cores (what stays fp32 under bf16
    autocast: the loss, norms, the optimizer; and whole runs with --mixed_precision no). PyTorch's
    default keeps full fp32 matmuls; nanoGPT and most training code turn TF32 on. A no-op elsewhere."""
    if device.type != "cuda":
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return True


def compile_for_training(model: torch.nn.Module, args: LoopArguments, accelerator: Accelerator) -> None:
    """With --compile, compile `model` in place (`nn.Module.compile`: the module, its parameters and
    its state dict keep their names, so checkpoints, `unwrap_model` and the saved folder are the
    same as without it) and print it. Called by `lifecycle.train`, after sharding or
    `accelerator.prepare` (compiling the module inside DDP keeps DDP's gradient hooks outside the
    graph) and after the evaluation before training."""
    if not args.compile:
        return
    accelerator.unwrap_model(model).compile()
    if accelerator.is_main_process:
        print("compile: torch.compile (inductor), in place; the first steps include the compile time")
