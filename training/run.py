"""The run lifecycle every job shares: open → prepare → evaluate before → train → finish.

A job (pretraining, SFT, classification; a DPO job would be one more module) imports this module
as `lifecycle` and reads as

    run = lifecycle.open_run("sft", "SFT", loop_args)   # the Accelerator and the run folder's layout
    ... its own inputs: load and check everything, build the model and the datasets ...
    prepared = lifecycle.prepare(run, model, train_loader, eval_loader, fingerprint=..., config=..., summary=...)
    before = lifecycle.evaluate_before(prepared, scores, enabled)   # step 0, on a fresh run
    after = lifecycle.train(prepared, eval_fn)          # train_loop; the final evaluation's values
    model_dir, adapter_dir = lifecycle.finish(prepared, tokenizer, card=..., json_files=..., report=...)

Nothing is written into the output folder before `prepare`: every input is checked first, and
`prepare` is the one place that decides whether the folder may hold this run (`check_run_folder`)
and then claims it (`start_run_folder`). It also builds the optimizer, wraps everything with
`accelerator.prepare`, resumes from the latest checkpoint and starts the trackers. `finish` is
the shared ending: the loss curve, the model folder with its card (and a LoRA adapter), the JSON
results, the report and a clean shutdown of every process.

Fine-tuning jobs start from a saved folder: `BaseModelArguments`, `load_base_tokenizer`,
`load_base_model`, `max_length_for` and `fine_tuning_fingerprint` are theirs.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from modeling_minigpt.files import atomic_write_json, save_figure
from tokenization.load import check_tokenizer, load_tokenizer, tokenizer_fingerprint
from training.distributed import (
    RankBatches,
    ShardedTrainingState,
    check_can_shard,
    shard_for_training,
    unsharded,
)
from training.export import check_model_folder, is_peft_model, save_finetuned
from training.generate import eval_mode
from training.layout import RunLayout, describe_run_files
from training.loop import (
    LoopArguments,
    LossFn,
    MetricsLog,
    TrainState,
    causal_lm_loss,
    log_metrics,
    make_accelerator,
    make_optimizer,
    resume_from_latest,
    start_trackers,
    train_loop,
)
from training.model_card import TrainingInfo, describe_hardware
from training.plots import LOSS_CURVE_DPI, loss_curve_figure
from training.schedule import describe_schedule

# A job's evaluation: (the numbers logged to metrics.jsonl, whatever else it found, e.g. generations).
Scores = Callable[[torch.nn.Module], tuple[dict[str, float], Any]]


# ----------------------------------------------------------------------------- run folders


class RunFolderError(ValueError):
    """The output folder cannot be used for this run (holds another run, or unrelated files)."""


def _diff(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """Human-readable differences between two nested dicts, one line per differing leaf."""
    lines = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<missing>"), current.get(key, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict):
            lines += _diff(a, b, f"{prefix}{key}.")
        elif a != b:
            lines.append(f"  {prefix}{key}: saved run has {a!r}, this run has {b!r}")
    return lines


def check_run_folder(
    output_dir: str | os.PathLike[str], fingerprint: dict[str, Any], *, resume: bool, overwrite: bool
) -> None:
    """Raise RunFolderError unless `output_dir` may hold this run. Reads only; writes nothing.

    `fingerprint` holds everything that must match for a resumed run to be the same run (model
    shape, tokenizer hash, data, optimisation settings). A folder is usable when it is missing or
    empty, when it holds this same run and `resume` is set, or when it holds some run and
    `overwrite` is set. A non-empty folder without a run_config.json is never touched.
    """
    layout = RunLayout(Path(output_dir))
    if not layout.root.exists():
        return
    if not layout.root.is_dir():
        raise RunFolderError(f"output folder {layout.root} exists and is not a folder")
    if not any(layout.root.iterdir()):
        return
    if not layout.run_config.is_file():
        raise RunFolderError(
            f"output folder {layout.root} is not empty and holds no {layout.run_config.name}: it is not a run "
            "folder, so it is neither resumed nor overwritten. Choose an empty or new folder."
        )
    if overwrite:
        return
    saved = json.loads(layout.run_config.read_text())["fingerprint"]
    if not resume:
        raise RunFolderError(
            f"output folder {layout.root} already holds a run. Pass --resume to continue it "
            "or --overwrite to delete it and start again."
        )
    differences = _diff(saved, fingerprint)
    if differences:
        raise RunFolderError(
            f"cannot resume the run in {layout.root}: its configuration differs from this one:\n"
            + "\n".join(differences)
            + "\nUse the original settings to resume, or --overwrite / another output folder to start a new run."
        )


def start_run_folder(
    output_dir: str | os.PathLike[str], fingerprint: dict[str, Any], config: dict[str, Any], *, overwrite: bool
) -> Path:
    """Create (or, with `overwrite`, empty) the run folder and record the run's configuration.

    Call on the main process only, after `check_run_folder` passed.
    """
    layout = RunLayout(Path(output_dir))
    if overwrite and layout.run_config.is_file():
        shutil.rmtree(layout.root)
    layout.root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(layout.run_config, {"fingerprint": fingerprint, "config": config})
    return layout.root


# ----------------------------------------------------------------------------- the run fingerprint


def file_identity(path: str | os.PathLike[str] | None) -> dict[str, Any] | None:
    """Path and size of a file, for a resume fingerprint (None stays None)."""
    if path is None:
        return None
    p = Path(path)
    return {"path": str(p.resolve()), "size": p.stat().st_size if p.is_file() else None}


def model_identity(model_dir: Path) -> dict[str, Any]:
    """What identifies a saved base model: its config and weight files."""
    weights = sorted(p.name for p in model_dir.glob("*.safetensors")) or sorted(p.name for p in model_dir.glob("*.bin"))
    return {
        "config": file_identity(model_dir / "config.json"),
        "weights": [file_identity(model_dir / w) for w in weights],
    }


def optimization_fingerprint(loop_args: LoopArguments) -> dict[str, Any]:
    """The loop settings a resumed run must keep (logging, eval and checkpoint cadence may change)."""
    not_binding = {
        "output_dir",
        "log_every",
        "eval_every",
        "save_every",
        "keep_last",
        "resume",
        "overwrite",
        "report_to",
    }
    return {k: v for k, v in asdict(loop_args).items() if k not in not_binding}


def run_fingerprint(loop_args: LoopArguments, **parts: Any) -> dict[str, Any]:
    """What must be equal for a resumed run to continue the same run (see `check_run_folder`):
    the job's `parts` (model, tokenizer, data, ...) and the optimisation."""
    return {**parts, "optimization": optimization_fingerprint(loop_args)}


# ----------------------------------------------------------------------------- the base model of fine-tuning


@dataclass
class BaseModelArguments:
    """The saved folder a fine-tuning job starts from."""

    model_path: str = field(
        default=None,
        metadata={
            "help": "Saved causal LM folder to start from (MiniGPT, or GPT-2 converted by "
            "scripts/convert_gpt2.py). Required."
        },
    )
    tokenizer_path: str | None = field(default=None, metadata={"help": "Tokenizer folder. Default: the model folder."})


def load_base_tokenizer(args: BaseModelArguments) -> PreTrainedTokenizerBase:
    """The tokenizer saved with the base model (or at `tokenizer_path`), ready to pad.

    A tokenizer without a pad token pads with eos: padded positions are masked out of attention
    and loss, so the id does not matter.
    """
    check_model_folder(args.model_path, "--model_path")
    tokenizer = load_tokenizer(args.tokenizer_path or args.model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(
    args: BaseModelArguments, auto_class: Any, tokenizer: PreTrainedTokenizerBase, seed: int, **kwargs: Any
) -> Any:
    """`auto_class.from_pretrained(model_path, **kwargs)`, seeded (new heads and LoRA's matrices start
    the same in every rerun) and checked against `tokenizer`.

    MiniGPT is registered with the Auto classes (importing the model package does it), so a
    MiniGPT folder loads with this package's classes and the fine-tuned folder carries its code.
    """
    set_seed(seed)
    model = auto_class.from_pretrained(
        check_model_folder(args.model_path, "--model_path"), trust_remote_code=True, **kwargs
    )
    check_tokenizer(tokenizer, model.config.vocab_size)
    return model


def max_length_for(model: Any, requested: int | None) -> int:
    """Tokens per example: `requested`, at most the model's context length (its default)."""
    context_length = model.config.max_position_embeddings
    return min(requested or context_length, context_length)


def fine_tuning_fingerprint(
    args: Any,
    tokenizer: PreTrainedTokenizerBase,
    loop_args: LoopArguments,
    lora_args: Any,
    max_length: int,
    data: dict[str, Any],
    **training: Any,
) -> dict[str, Any]:
    """A fine-tuning run's fingerprint: the base model of `args` (the job's BaseModelArguments, with
    its `finetune` mode) and the tokenizer, the job's `data`, and how it trains (`max_length`, the
    mode, the LoRA settings of a LoRA run, the job's own `training` settings)."""
    model_dir = Path(args.model_path)
    lora = asdict(lora_args) if args.finetune == "lora" else None
    return run_fingerprint(
        loop_args,
        base_model={"path": str(model_dir.resolve()), **model_identity(model_dir)},
        tokenizer=tokenizer_fingerprint(tokenizer),
        data=data,
        training={"max_length": max_length, **training, "finetune": args.finetune, "lora": lora},
    )


# ----------------------------------------------------------------------------- the lifecycle


@dataclass(frozen=True)
class Run:
    """An opened run: where it writes and what it runs on. Nothing is written yet."""

    project: str  # tracker project name, e.g. "sft"
    title: str  # what the loss curve calls it, e.g. "SFT"
    args: LoopArguments
    accelerator: Accelerator
    layout: RunLayout

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process


def open_run(project: str, title: str, loop_args: LoopArguments) -> Run:
    """The run's Accelerator and folder layout; refuses a missing --output_dir. Writes nothing."""
    if not loop_args.output_dir:
        raise ValueError("--output_dir is required: the folder for checkpoints, logs and the final model")
    return Run(project, title, loop_args, make_accelerator(loop_args), RunLayout(Path(loop_args.output_dir)))


@dataclass
class PreparedRun:
    """Everything `train_loop` needs, after `accelerator.prepare` and an optional resume."""

    run: Run
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    train_loader: DataLoader
    eval_loader: DataLoader
    state: TrainState
    metrics: MetricsLog
    resumed_at: int | None  # the checkpoint's step, None for a fresh start


def prepare(
    run: Run,
    model: torch.nn.Module,
    train_loader: DataLoader | RankBatches,
    eval_loader: DataLoader,
    *,
    fingerprint: dict[str, Any],
    config: dict[str, dict[str, Any]],
    summary: str,
    shard: bool = False,
) -> PreparedRun:
    """The first write: check that the folder may hold this run, record it (main process) and
    print its configuration; then the optimizer over the trainable parameters, `accelerator.prepare`,
    the resume and the trackers. Every process calls it. With `shard`, the model is sharded with
    FSDP2 (`training.distributed.shard_for_training`) instead of wrapped in DDP."""
    args, accelerator = run.args, run.accelerator
    if shard:
        check_can_shard(accelerator)
    check_run_folder(run.layout.root, fingerprint, resume=args.resume, overwrite=args.overwrite)
    accelerator.wait_for_everyone()  # every process has read the folder before the main process claims it
    if run.is_main:
        start_run_folder(run.layout.root, fingerprint, config, overwrite=args.overwrite)
        print("resolved configuration:")
        print(json.dumps(config, indent=2, sort_keys=True, default=str))
        print(summary)
        print(f"outputs: {run.layout.root.resolve()}")
        print(describe_run_files())
    accelerator.wait_for_everyone()

    if shard:  # before the optimizer, which must hold the sharded parameters
        model = shard_for_training(accelerator, model)
    optimizer = make_optimizer(model, args)
    if not shard:  # a sharded model must not be wrapped in DDP; its state is checkpointed whole, below
        model, optimizer = accelerator.prepare(model, optimizer)
    eval_loader = accelerator.prepare(eval_loader)
    if isinstance(train_loader, DataLoader):  # a stream split by rank (`RankBatches`) would be split again
        train_loader = accelerator.prepare(train_loader)
    state = TrainState()
    accelerator.register_for_checkpointing(state)
    if shard:
        accelerator.register_for_checkpointing(ShardedTrainingState(model, optimizer))
    metrics = MetricsLog(run.layout.metrics, enabled=run.is_main)
    resumed_at = resume_from_latest(accelerator, run.layout.root, metrics) if args.resume else None
    if run.is_main and args.resume:
        print(
            f"resuming from step {resumed_at}" if resumed_at is not None else "no checkpoint yet: starting from step 0"
        )
    flat = {f"{section}.{key}": value for section, values in config.items() for key, value in values.items()}
    start_trackers(accelerator, run.project, flat, resumed_at)
    return PreparedRun(run, model, optimizer, train_loader, eval_loader, state, metrics, resumed_at)


def evaluate_before(prepared: PreparedRun, scores: Scores, enabled: bool) -> dict[str, float] | None:
    """The untrained model's numbers, logged at step 0 (the "before" of the report).

    Measured on a fresh run when `enabled`; a resumed run reads them back from its log.
    """
    run = prepared.run
    if enabled and prepared.resumed_at is None:
        with eval_mode(prepared.model), torch.no_grad():
            values, _ = scores(prepared.model)
        log_metrics(run.accelerator, prepared.metrics, 0, {"tokens": 0, **values})
        if run.is_main:
            print("before training: " + "  ".join(f"{k}={v:.4f}" for k, v in values.items()))
        return values
    logged = next(
        (r for r in prepared.metrics.records() if r["step"] == 0 and any(k.startswith("val_") for k in r)), None
    )
    return {k: v for k, v in logged.items() if k not in ("step", "tokens")} if logged else None


@dataclass
class LastEvaluation:
    """An `eval_fn` for `train_loop` that keeps what its last call found beyond the logged numbers
    (SFT's generations, a classifier's confusion matrix), so the final evaluation need not run twice."""

    evaluate: Scores
    detail: Any = None

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        values, self.detail = self.evaluate(model)
        return values


def train(
    prepared: PreparedRun,
    eval_fn: Callable[[torch.nn.Module], Mapping[str, Any]] | None,
    loss_fn: LossFn = causal_lm_loss,
) -> dict[str, Any] | None:
    """`train_loop` on the prepared run, redrawing the loss curve after every evaluation; returns
    the values of the final evaluation (None when the loop had nothing left to do)."""
    return train_loop(
        prepared.run.accelerator,
        prepared.model,
        prepared.optimizer,
        prepared.train_loader,
        prepared.run.args,
        prepared.state,
        prepared.metrics,
        loss_fn=loss_fn,
        eval_fn=eval_fn,
        on_eval=lambda state: _draw_loss_curve(prepared),
    )


def _draw_loss_curve(prepared: PreparedRun) -> None:
    run = prepared.run
    figure = loss_curve_figure(prepared.metrics.records(), title=f"{run.title} {run.layout.root.name}")
    save_figure(figure, run.layout.loss_curve, dpi=LOSS_CURVE_DPI)


def run_totals(prepared: PreparedRun) -> dict[str, Any]:
    """What every job's final_metrics.json says about the run itself."""
    state = prepared.state
    return {"steps": state.step, "tokens_seen": state.tokens_seen, "train_seconds": state.train_seconds}


def training_info(prepared: PreparedRun, data: str, *, tokens_per_sequence: int | None = None) -> TrainingInfo:
    """What the model card says about the run: the data in words, then from its state the tokens,
    steps, schedule, time and hardware."""
    num_processes = prepared.run.accelerator.num_processes
    return {
        "data": data,
        "tokens_seen": prepared.state.tokens_seen,
        "steps": prepared.state.step,
        "schedule": describe_schedule(prepared.run.args, num_processes, tokens_per_sequence),
        "wall_time_seconds": prepared.state.train_seconds,
        "hardware": describe_hardware(num_processes),
    }


def finish(
    prepared: PreparedRun,
    tokenizer: PreTrainedTokenizerBase,
    *,
    card: Mapping[str, Any],
    json_files: Mapping[Path, Any],
    report: str,
    extra_files: Sequence[Path] = (),
) -> tuple[Path, Path | None]:
    """The shared ending, on the main process: the loss curve, the model folder with its card
    (`card`: `write_model_card` arguments besides the config; a PEFT model is saved as its adapter
    and merged; `extra_files`, e.g. a job's own figures, are copied in beside the loss curve), the
    `json_files`, and `report` then where the model went. Every process calls it, waits for the
    others and gets (model folder, adapter folder or None)."""
    run = prepared.run
    model = unsharded(run.accelerator.unwrap_model(prepared.model))  # a sharded one gathered to the main process
    adapter = run.layout.adapter if is_peft_model(model) else None
    if run.is_main:
        _draw_loss_curve(prepared)
        card = {"model_name": run.layout.root.resolve().name, **card}
        extra = [run.layout.loss_curve, *extra_files]
        save_finetuned(model, tokenizer, run.layout.model, run.layout.adapter, card=card, extra_files=extra)
        for path, content in json_files.items():
            atomic_write_json(path, content)
        print(report)
        print(f"model saved to {run.layout.model}" + (f" (adapter in {adapter})" if adapter else ""))
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()
    return run.layout.model, adapter
