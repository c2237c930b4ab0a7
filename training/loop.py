"""The training loop shared by pretraining, instruction fine-tuning and classification.

Callers build the model and dataloaders (`training.run` does it for every job) and supply two
callbacks: `loss_fn(model, batch)` and `eval_fn(model)`. Everything else lives here once: the
optimizer's weight-decay groups, the Accelerator setup (gradient accumulation, mixed precision,
a seeded data order), exact resume (`TrainState` + `training.checkpoint`), the metrics log
and the loop itself:

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
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin, ProjectConfiguration, broadcast
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from modeling_minigpt.files import atomic_path
from training.checkpoint import Resumable, latest_checkpoint, resume, save_checkpoint
from training.generate import eval_mode
from training.layout import RunLayout
from training.schedule import learning_rate

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
    mixed_precision: Literal["no", "bf16", "fp16"] = field(
        default="no",
        metadata={"help": "Autocast dtype. Keep 'no' on CPU: bf16 matmuls measured ~35x slower than fp32 here."},
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
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def make_accelerator(args: LoopArguments) -> Accelerator:
    """An Accelerator for `args`; creates no files (trackers start in `start_trackers`).

    The gradient-accumulation counter ignores epoch ends (`sync_with_dataloader=False`) so every
    optimizer step sees exactly `gradient_accumulation_steps` micro-batches, even across epochs.
    The seedable sampler makes the shuffled order a function of (seed, epoch) on every process.
    """
    return Accelerator(
        mixed_precision=args.mixed_precision,
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
    checkpoint taken right then resumes at the new epoch instead of replaying an empty one.
    """
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


class _Clock:
    """Wall time across resumed segments; with `synchronized`, rank 0's clock is broadcast so that
    every process takes the same time-dependent decisions (learning rate, when to stop)."""

    def __init__(self, accelerator: Accelerator, state: TrainState, synchronized: bool):
        self.accelerator, self.state, self.synchronized = accelerator, state, synchronized
        self.start, self.start_seconds = time.perf_counter(), state.train_seconds

    def tick(self) -> float:
        elapsed = torch.tensor(self.start_seconds + time.perf_counter() - self.start, dtype=torch.float64)
        if self.synchronized and self.accelerator.num_processes > 1:
            elapsed = broadcast(elapsed, from_process=0)
        self.state.train_seconds = elapsed.item()
        return self.state.train_seconds


class _LogWindow:
    """Mean training loss and training throughput since the last log line."""

    def __init__(self, tokens_seen: int):
        self._reset(tokens_seen)

    def _reset(self, tokens_seen: int) -> None:
        self.loss_sum, self.steps, self.tokens_start = 0.0, 0, tokens_seen
        self.start, self.pause_seconds = time.perf_counter(), 0.0

    def add(self, step_loss: float) -> None:
        self.loss_sum, self.steps = self.loss_sum + step_loss, self.steps + 1

    @contextmanager
    def paused(self) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.pause_seconds += time.perf_counter() - start

    def flush(self, tokens_seen: int) -> dict[str, float]:
        seconds = max(time.perf_counter() - self.start - self.pause_seconds, 1e-9)
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
    Raises NonFiniteLossError, before updating the weights, if a step's loss or gradient is not finite.
    """
    if len(train_dataloader) == 0:
        raise ValueError("the training dataloader yields no batch: fewer examples than one batch (drop_last)")
    checkpoints_root = RunLayout(Path(args.output_dir)).checkpoints
    accumulation = args.gradient_accumulation_steps
    max_norm = args.max_grad_norm if args.max_grad_norm > 0 else math.inf  # inf: measure the norm, never clip
    batches = _micro_batches(accelerator, train_dataloader, state)
    timed = args.max_time_seconds is not None
    clock = _Clock(accelerator, state, synchronized=timed)
    progress = tqdm(  # mininterval: redrawing costs ~3 ms, noticeable next to a small model's step
        total=None if timed else args.max_steps,
        initial=state.step,
        unit="step",
        mininterval=1.0,
        disable=not accelerator.is_main_process,
        dynamic_ncols=True,
    )
    window = _LogWindow(state.tokens_seen)
    evaluation = None
    model.train()

    elapsed = clock.tick()
    done = state.step >= args.max_steps or (timed and elapsed >= args.max_time_seconds)
    while not done:
        lr = learning_rate(args, state.step, elapsed)
        for group in optimizer.param_groups:
            group["lr"] = lr

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

        elapsed = clock.tick()
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
