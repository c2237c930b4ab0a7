"""The training loop shared by every job: accumulate -> backward -> clip -> step -> schedule.

Callers build the model, the optimizer (`training.run.optim`), the Accelerator
(`training.run.accelerator`) and the dataloaders (`training.run.lifecycle` does it for every job) and
supply two callbacks: `loss_fn(model, batch)` and `eval_fn(model)`. Here: the train state and exact
resume (`TrainState` + `training.run.checkpoint`), the metrics log, periodic evaluation and
checkpoints, and the loop itself.

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
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import (
    broadcast,
)
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from modeling_minigpt.files import atomic_path
from training.evaluation.generate import eval_mode
from training.run.arguments import LoopArguments
from training.run.checkpoint import Resumable, latest_checkpoint, resume, save_checkpoint
from training.run.schedule import lr_factor
from training.run.zero import is_deepspeed
from training.saved.layout import RunLayout

Batch = Mapping[str, torch.Tensor]
LossFn = Callable[[torch.nn.Module, Batch], torch.Tensor]
EvalFn = Callable[[torch.nn.Module], Mapping[str, float | str]]


@dataclass
class TrainState:
    """What the loop has done so far; saved in every checkpoint (as JSON, `training.run.checkpoint`)."""

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
        pin_memory=torch.cuda.is_available(),  # page-locked host batches copy to the GPU asynchronously
    )


def _micro_batches(accelerator: Accelerator, dataloader: DataLoader, state: TrainState) -> Iterator[Batch]:
    """Micro-batches forever, epoch after epoch, starting where `state` says (mid-epoch on resume).

    `state` moves to the next epoch as soon as an epoch's last batch is handed out, so a
    checkpoint taken right then resumes at the new epoch instead of replaying an empty one. A
    stream (`training.run.distributed.RankBatches`: no length) moves on when it runs out, and on
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
    group has none) times the schedule's factor (`training.run.schedule.lr_factor`).
    Raises NonFiniteLossError, before updating the weights (under DeepSpeed, which steps inside
    backward, after), if a step's loss or gradient is not finite or above --divergence_loss.
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

        # DeepSpeed has already clipped and stepped inside backward (its engine.step), and hands back
        # the norm it measured as a float.
        grad_norm = torch.as_tensor(accelerator.clip_grad_norm_(model.parameters(), max_norm))
        step_loss = accelerator.reduce(step_loss, reduction="mean")  # the same value on every process
        finite = bool(torch.isfinite(step_loss) and torch.isfinite(grad_norm))
        if not finite or step_loss.item() > args.divergence_loss:
            last = latest_checkpoint(checkpoints_root)
            what = (
                "non-finite training loss"
                if not finite
                else f"training loss above --divergence_loss {args.divergence_loss}"
            )
            stopped = (
                "DeepSpeed had already applied this step inside backward"
                if is_deepspeed(accelerator)
                else "Stopped before updating the weights"
            )
            raise NonFiniteLossError(
                f"the run diverged: {what} at step {state.step + 1}: "
                f"loss={step_loss.item()}, grad_norm={grad_norm.item()}. {stopped}; "
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
