"""The settings every training job shares: optimisation, precision, logging, checkpointing, the run folder.

One dataclass (`LoopArguments`); its fields become the scripts' flags and YAML keys (training.cli), and
its `__post_init__` checks each value where it is read, before anything is written."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class LoopArguments:
    """Optimisation, logging and checkpointing settings shared by every training script."""

    output_dir: str | None = field(
        default=None, metadata={"help": "Run folder: checkpoints, logs, metrics, final model. Required."}
    )
    max_steps: int = field(
        default=1000,
        metadata={
            "help": "Optimizer steps to train (each = accumulation x batch). With --max_time_seconds, an upper bound."
        },
    )
    max_time_seconds: float | None = field(
        default=None,
        metadata={
            "help": "Wall-clock training budget in seconds (evaluations included). The cosine decay then runs "
            "over the budget instead of max_steps; such runs resume, but not bit-exactly."
        },
    )
    per_device_batch_size: int = field(default=8, metadata={"help": "Sequences per micro-batch on each process."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate, reached after warmup."})
    min_learning_rate: float = field(
        default=1e-4, metadata={"help": "Floor of the cosine decay (often learning_rate / 10)."}
    )
    warmup_steps: int = field(default=100, metadata={"help": "Optimizer steps of linear warmup."})
    weight_decay: float = field(
        default=0.1, metadata={"help": "AdamW decoupled weight decay, applied to matrices only (>= 2-D)."}
    )
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(
        default=0.95, metadata={"help": "AdamW beta2 (0.95 rather than 0.999: steadier for small-batch LM training)."}
    )
    max_grad_norm: float = field(
        default=1.0, metadata={"help": "Clip the global gradient norm to this; 0 disables clipping."}
    )
    optimizer: Literal["adamw", "muon"] = field(
        default="adamw",
        metadata={
            "help": "adamw: AdamW for every parameter. muon: torch.optim.Muon for the 2-D matrices inside the "
            "transformer blocks (at --muon_learning_rate), AdamW for embeddings, head, biases and norms "
            "(at --learning_rate)."
        },
    )
    muon_learning_rate: float = field(
        default=0.02,
        metadata={
            "help": "Muon's peak learning rate (--optimizer muon); the schedule scales it like --learning_rate, "
            "down to the same fraction --min_learning_rate / --learning_rate."
        },
    )
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = field(
        default="auto",
        metadata={
            "help": "Autocast dtype; weights and optimizer state stay fp32. auto: bf16 where the hardware runs it "
            "natively (a CPU with AVX-512 BF16 or AMX, a GPU with bf16), fp32 ('no') elsewhere: on CPUs without "
            "them bf16 matmuls run far slower than fp32. The choice is printed."
        },
    )
    attention: Literal["auto", "sdpa", "eager"] = field(
        default="auto",
        metadata={
            "help": "Attention path while training (the saved model keeps its default, sdpa). auto: eager (the "
            "hand-written matmul + softmax) under bf16 autocast on a CPU with a context of at most 512 tokens, "
            "where torch's fused kernel runs bf16 slowly; sdpa everywhere else. The choice is printed."
        },
    )
    compile: bool = field(
        default=False,
        metadata={
            "help": "Compile the model for training with torch.compile (inductor, in place: the saved weights and "
            "checkpoints are the same as without it). The first steps include the compile time (tens of seconds "
            "on a CPU); worth it for long runs, above all on GPUs."
        },
    )
    seed: int = field(default=1337, metadata={"help": "Seeds weights init, dropout and the data order."})
    log_every: int = field(default=10, metadata={"help": "Log the mean training loss every N steps."})
    eval_every: int = field(
        default=200, metadata={"help": "Evaluate (and write a sample) every N steps and at the end."}
    )
    save_every: int = field(default=200, metadata={"help": "Checkpoint every N steps and at the end."})
    keep_last: int = field(default=2, metadata={"help": "Checkpoints kept on disk (older ones are deleted)."})
    resume: bool = field(
        default=False, metadata={"help": "Continue the run in output_dir from its latest complete checkpoint."}
    )
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "Replace the run already in output_dir: it is set aside, deleted once the new run has its "
            "first checkpoint, and put back if the new run fails before."
        },
    )
    report_to: Literal["tensorboard", "none"] = field(
        default="tensorboard", metadata={"help": "Accelerate tracker (logs go to output_dir/logs)."}
    )
    divergence_loss: float = field(
        default=100.0,
        metadata={
            "help": "Stop as diverged when a step's training loss exceeds this (nats; uniform guessing over "
            "GPT-2's 50,257 tokens scores 10.8)."
        },
    )

    def __post_init__(self) -> None:
        positive = (
            "max_steps",
            "per_device_batch_size",
            "gradient_accumulation_steps",
            "log_every",
            "eval_every",
            "save_every",
            "keep_last",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if not self.muon_learning_rate > 0:
            raise ValueError(f"--muon_learning_rate must be > 0, got {self.muon_learning_rate}")
        if self.max_time_seconds is not None and self.max_time_seconds <= 0:
            raise ValueError(f"--max_time_seconds must be > 0, got {self.max_time_seconds}")
        for name in ("warmup_steps", "weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("learning_rate", "divergence_loss"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"--seed must be in [0, 2**32), got {self.seed}")
        if not 0 <= self.min_learning_rate <= self.learning_rate:
            raise ValueError(
                "need 0 <= --min_learning_rate <= --learning_rate, "
                f"got {self.min_learning_rate} and {self.learning_rate}"
            )
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite contradict each other: pick one")
