"""The training loop shared by pretraining, instruction fine-tuning and classification.

Callers build the model and dataloaders (`training.run` does it for every job) and supply two
callbacks: `loss_fn(model, batch)` and `eval_fn(model)`. Everything else lives here once: the
optimizer (AdamW with weight-decay groups, or Muon for the hidden matrices plus AdamW, as one
optimizer), the Accelerator setup (gradient accumulation, mixed precision chosen for the
hardware, a seeded data order), exact resume (`TrainState` + `training.checkpoint`), the
metrics log and the loop itself:

    accumulate -> backward -> clip -> step -> schedule

A run is reproducible to the bit on CPU: the data order is a function of (seed, epoch), the
learning rate a function of the step, and a checkpoint holds the RNG states, the optimizer, and
how many batches of the current epoch were consumed.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import (
    DataLoaderConfiguration,
    GradientAccumulationPlugin,
    ProjectConfiguration,
    broadcast,
    parse_flag_from_env,
)
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from modeling_minigpt.files import atomic_path
from training.checkpoint import Resumable, latest_checkpoint, resume, save_checkpoint
from training.generate import eval_mode
from training.layout import RunLayout
from training.schedule import lr_factor

Batch = Mapping[str, torch.Tensor]
LossFn = Callable[[torch.nn.Module, Batch], torch.Tensor]
EvalFn = Callable[[torch.nn.Module], Mapping[str, float | str]]


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
    overwrite: bool = field(default=False, metadata={"help": "Delete the run already in output_dir and start again."})
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


@dataclass
class TrainState:
    """What the loop has done so far; saved in every checkpoint (as JSON, `training.checkpoint`)."""

    step: int = 0  # optimizer steps completed
    tokens_seen: int = 0  # input positions consumed, summed over processes (padding included)
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of `epoch` already consumed by each process
    train_seconds: float = 0.0  # wall time spent in the loop, over all resumed segments

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class NonFiniteLossError(RuntimeError):
    """The run diverged: the loss or gradient norm became NaN/inf, or the loss exceeded
    `divergence_loss`; no update was applied for that step."""


def build_optimizer(
    model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.95)
) -> torch.optim.AdamW:
    """AdamW that decays matrices (weights of linear and embedding layers) but not biases or norms.

    Decaying LayerNorm gains or biases pulls them toward 0 for no regularising benefit (nanoGPT,
    GPT-2/3). Tied weights appear once (`parameters()` de-duplicates shared tensors); frozen
    parameters are left out.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(_decay_groups(params, lr, weight_decay), betas=betas)


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
    ):
        self.muon = torch.optim.Muon(muon_groups)
        self.adamw = torch.optim.AdamW(adamw_groups, betas=betas)
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
    return MuonWithAdamW(muon, _decay_groups(rest, lr, weight_decay), betas=betas)


def make_optimizer(model: torch.nn.Module, args: LoopArguments) -> torch.optim.Optimizer:
    """The optimizer `args` asks for, over the model's trainable parameters."""
    betas = (args.adam_beta1, args.adam_beta2)
    if args.optimizer == "muon":
        return build_muon_optimizer(model, args.learning_rate, args.muon_learning_rate, args.weight_decay, betas)
    return build_optimizer(model, args.learning_rate, args.weight_decay, betas)


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
# on a CPU with AVX-512 BF16 (`python scripts/bench_model.py --attention`, torch 2.13): 1.8x faster
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
    `training.run.prepare` calls it again). Only the run's copy changes: `attn_implementation`
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
    process = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    mixed_precision, why = resolve_mixed_precision(args.mixed_precision, process.device)
    if process.is_main_process:
        print(f"mixed precision: {'bf16 autocast' if mixed_precision == 'bf16' else mixed_precision} ({why})")
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


def causal_lm_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Default `loss_fn`: the model computes its own loss from the batch's labels/shift_labels."""
    return model(**batch).loss


class MetricsLog:
    """metrics.jsonl: one JSON object per line, each with a "step"; written by the main process only.

    JSONL rather than a tracker's binary format so tests and plots can read it back, and so a
    resumed run can cut the entries logged after its checkpoint (no repeats in the curve).
    """

    def __init__(self, path: str | os.PathLike[str], enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def records(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        records = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut short by a crash ends the log
        return records

    def truncate_after(self, step: int) -> None:
        """Drop entries logged after `step` (they will be logged again by the resumed run)."""
        if not self.enabled:
            return
        kept = [r for r in self.records() if r["step"] <= step]
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")

    def write(self, record: Mapping[str, Any]) -> None:
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(dict(record)) + "\n")


def resume_from_latest(
    accelerator: Accelerator, output_dir: str | os.PathLike[str], metrics: MetricsLog, parts: Resumable
) -> int | None:
    """Load the latest intact checkpoint under output_dir/checkpoints into `parts`; return its
    step (None if none). A damaged one is skipped for the one before it, with a line saying so.

    Call after `accelerator.prepare`. The metrics log is cut back to the checkpoint (or emptied
    when there is none: the run starts over), so the resumed run's entries follow without gaps
    or repeats.
    """
    say = print if accelerator.is_main_process else (lambda message: None)
    step = resume(accelerator, RunLayout(Path(output_dir)).checkpoints, parts, say)
    metrics.truncate_after(-1 if step is None else step)
    return step


def start_trackers(
    accelerator: Accelerator, project_name: str, config: Mapping[str, Any], resume_step: int | None
) -> None:
    """Start the Accelerate trackers; a resumed run purges TensorBoard events after its checkpoint."""
    scalars = {k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))}
    init_kwargs = {"tensorboard": {"purge_step": resume_step + 1}} if resume_step is not None else {}
    accelerator.init_trackers(project_name, config=scalars, init_kwargs=init_kwargs)


def log_metrics(accelerator: Accelerator, metrics: MetricsLog, step: int, values: Mapping[str, Any]) -> None:
    """Send `values` to the trackers and append them (with the step) to metrics.jsonl."""
    accelerator.log(dict(values), step=step)
    metrics.write({"step": step, **values})


def make_train_dataloader(
    dataset: Any, batch_size: int, collate_fn: Callable[[list[Any]], Batch], seed: int, num_workers: int = 0
) -> DataLoader:
    """A shuffled training DataLoader (full batches only) that exact resume can rely on.

    Its own generator matters: a DataLoader without one draws a seed from the *global* torch RNG
    each time an iterator starts, and the global RNG also drives dropout. A resumed run starts
    its iterator at a different moment than the uninterrupted run did, so its dropout masks would
    differ. (The shuffle order itself comes from accelerate's seedable sampler: seed + epoch.)
    """
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,  # every step sees the same number of tokens, on every process
        collate_fn=collate_fn,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
    )


def _micro_batches(accelerator: Accelerator, dataloader: DataLoader, state: TrainState) -> Iterator[Batch]:
    """Micro-batches forever, epoch after epoch, starting where `state` says (mid-epoch on resume).

    `state` moves to the next epoch as soon as an epoch's last batch is handed out, so a
    checkpoint taken right then resumes at the new epoch instead of replaying an empty one. A
    stream (`training.distributed.RankBatches`: no length) moves on when it runs out, and on
    resume reads past the batches already consumed.
    """
    if not hasattr(dataloader, "__len__"):
        yield from _stream_micro_batches(dataloader, state)
        return
    per_epoch = len(dataloader)
    while True:
        dataloader.set_epoch(state.epoch)  # the shuffled order is a function of (seed, epoch)
        loader = (
            accelerator.skip_first_batches(dataloader, state.batches_in_epoch) if state.batches_in_epoch else dataloader
        )
        for batch in loader:
            state.batches_in_epoch += 1
            if state.batches_in_epoch == per_epoch:
                state.epoch, state.batches_in_epoch = state.epoch + 1, 0
            yield batch


def _stream_micro_batches(stream: Any, state: TrainState) -> Iterator[Batch]:
    while True:
        stream.set_epoch(state.epoch)
        for batch in islice(stream, state.batches_in_epoch, None):
            state.batches_in_epoch += 1
            yield batch
        if state.batches_in_epoch == 0:
            raise ValueError("the training stream yields no batch: fewer windows per process than one batch")
        state.epoch, state.batches_in_epoch = state.epoch + 1, 0


class _Clock:
    """Wall time across resumed segments; with `synchronized`, rank 0's clock is broadcast so that
    every process takes the same time-dependent decisions (learning rate, when to stop).
    `now` reads the time in seconds (a test passes its own clock)."""

    def __init__(self, accelerator: Accelerator, state: TrainState, synchronized: bool, now: Callable[[], float]):
        self.accelerator, self.state, self.synchronized, self.now = accelerator, state, synchronized, now
        self.start, self.start_seconds = now(), state.train_seconds

    def tick(self) -> float:
        elapsed = torch.tensor(self.start_seconds + self.now() - self.start, dtype=torch.float64)
        if self.synchronized and self.accelerator.num_processes > 1:
            elapsed = broadcast(elapsed, from_process=0)
        self.state.train_seconds = elapsed.item()
        return self.state.train_seconds


class _LogWindow:
    """Mean training loss and training throughput since the last log line."""

    def __init__(self, tokens_seen: int, now: Callable[[], float]):
        self.now = now
        self._reset(tokens_seen)

    def _reset(self, tokens_seen: int) -> None:
        self.loss_sum, self.steps, self.tokens_start = 0.0, 0, tokens_seen
        self.start, self.pause_seconds = self.now(), 0.0

    def add(self, step_loss: float) -> None:
        self.loss_sum, self.steps = self.loss_sum + step_loss, self.steps + 1

    @contextmanager
    def paused(self) -> Iterator[None]:
        start = self.now()
        yield
        self.pause_seconds += self.now() - start

    def flush(self, tokens_seen: int) -> dict[str, float]:
        seconds = max(self.now() - self.start - self.pause_seconds, 1e-9)
        values = {
            "train_loss": self.loss_sum / self.steps,
            "tokens_per_second": (tokens_seen - self.tokens_start) / seconds,
        }
        self._reset(tokens_seen)
        return values


def train_loop(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    train_dataloader: DataLoader,
    args: LoopArguments,
    state: TrainState,
    metrics: MetricsLog,
    *,
    loss_fn: LossFn = causal_lm_loss,
    eval_fn: EvalFn | None = None,
    on_eval: Callable[[TrainState], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
    on_checkpoint: Callable[[TrainState], None] | None = None,
) -> dict[str, float | str] | None:
    """Train until `args.max_steps` (or `args.max_time_seconds`) from wherever `state` stands;
    return the values of the last evaluation (the one at the final step), None if none ran.

    `model`, `optimizer` and `train_dataloader` must come from `accelerator.prepare`, and `state`
    resumed (if wanted) by the caller (`resume_from_latest`). Every process runs
    this; logs and checkpoint bookkeeping happen on the main process. `eval_fn(model)` returns
    metrics (floats) and optionally texts; it runs every `eval_every` steps and at the end, in
    eval mode without gradients, followed by `on_eval(state)` (e.g. redraw the loss curve);
    `on_checkpoint(state)` follows every complete checkpoint.
    `clock` reads the time in seconds, for `max_time_seconds` and the logged throughput.
    Each parameter group's learning rate is its `initial_lr` (its peak; the current lr when a
    group has none) times the schedule's factor (`training.schedule.lr_factor`).
    Raises NonFiniteLossError, before updating the weights, if a step's loss or gradient is not finite.
    """
    if hasattr(train_dataloader, "__len__") and len(train_dataloader) == 0:
        raise ValueError("the training dataloader yields no batch: fewer examples than one batch (drop_last)")
    checkpoints_root = RunLayout(Path(args.output_dir)).checkpoints
    accumulation = args.gradient_accumulation_steps
    max_norm = args.max_grad_norm if args.max_grad_norm > 0 else math.inf  # inf: measure the norm, never clip
    batches = _micro_batches(accelerator, train_dataloader, state)
    timed = args.max_time_seconds is not None
    timer = _Clock(accelerator, state, synchronized=timed, now=clock)
    progress = tqdm(  # mininterval: redrawing costs ~3 ms, noticeable next to a small model's step
        total=None if timed else args.max_steps,
        initial=state.step,
        unit="step",
        mininterval=1.0,
        disable=not accelerator.is_main_process,
        dynamic_ncols=True,
    )
    window = _LogWindow(state.tokens_seen, now=clock)
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    evaluation = None
    model.train()

    elapsed = timer.tick()
    done = state.step >= args.max_steps or (timed and elapsed >= args.max_time_seconds)
    while not done:
        factor = lr_factor(args, state.step, elapsed)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        lr = args.learning_rate * factor  # what the log calls lr: the schedule of --learning_rate

        step_loss = torch.zeros((), device=accelerator.device)
        for _ in range(accumulation):
            batch = next(batches)
            with accelerator.accumulate(model):  # no_sync on all but the last micro-batch
                loss = loss_fn(model, batch)
                accelerator.backward(loss)  # scaled by 1/accumulation inside
            step_loss += loss.detach() / accumulation
            state.tokens_seen += batch["input_ids"].numel() * accelerator.num_processes
        assert accelerator.sync_gradients, "the last micro-batch of a step must synchronise gradients"

        grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
        step_loss = accelerator.reduce(step_loss, reduction="mean")  # the same value on every process
        finite = bool(torch.isfinite(step_loss) and torch.isfinite(grad_norm))
        if not finite or step_loss.item() > args.divergence_loss:
            last = latest_checkpoint(checkpoints_root)
            what = (
                "non-finite training loss"
                if not finite
                else f"training loss above --divergence_loss {args.divergence_loss}"
            )
            raise NonFiniteLossError(
                f"the run diverged: {what} at step {state.step + 1}: "
                f"loss={step_loss.item()}, grad_norm={grad_norm.item()}. Stopped before updating the weights; "
                f"last good checkpoint: {last or 'none yet'}. Lower --learning_rate (or raise --warmup_steps)"
            )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        progress.update(1)

        elapsed = timer.tick()
        done = state.step >= args.max_steps or (timed and elapsed >= args.max_time_seconds)
        window.add(step_loss.item())
        save_now = done or state.step % args.save_every == 0
        # Logging also at checkpoints keeps the loss window empty when a checkpoint is taken, so
        # a resumed run logs exactly the same entries as an uninterrupted one.
        if done or save_now or state.step % args.log_every == 0:
            values = window.flush(state.tokens_seen)
            log_metrics(
                accelerator,
                metrics,
                state.step,
                {
                    "tokens": state.tokens_seen,
                    **values,
                    "lr": lr,
                    "grad_norm": grad_norm.item(),
                    "elapsed_seconds": elapsed,
                },
            )
            progress.set_postfix(loss=f"{values['train_loss']:.4f}", lr=f"{lr:.2e}", refresh=False)
        with window.paused():  # evaluation and checkpoints do not count against tokens_per_second
            if eval_fn is not None and (done or state.step % args.eval_every == 0):
                evaluation = _evaluate(accelerator, model, eval_fn, metrics, state)
                if on_eval is not None and accelerator.is_main_process:
                    on_eval(state)
            if save_now:
                parts = Resumable(model, optimizer, state, [train_dataloader])
                save_checkpoint(accelerator, checkpoints_root, state.step, args.keep_last, parts)
                if on_checkpoint is not None and accelerator.is_main_process:
                    on_checkpoint(state)
    progress.close()
    return evaluation


def _evaluate(
    accelerator: Accelerator, model: torch.nn.Module, eval_fn: EvalFn, metrics: MetricsLog, state: TrainState
) -> dict[str, float | str]:
    with eval_mode(model), torch.no_grad():
        results = dict(eval_fn(model))
    log_metrics(accelerator, metrics, state.step, {"tokens": state.tokens_seen, **results})
    if accelerator.is_main_process:
        shown = "  ".join(f"{k}={v:.4f}" for k, v in results.items() if isinstance(v, float))
        tqdm.write(f"step {state.step} ({state.tokens_seen:,} tokens): {shown}")
        for key, text in results.items():
            if isinstance(text, str):
                tqdm.write(f"{key}: {text!r}")
    return results
