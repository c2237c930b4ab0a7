"""The run lifecycle every job shares: open → prepare → evaluate before → train → finish.

Every job (`training.jobs`: pretraining, SFT, DPO, classification) imports this module as
`from training.run import lifecycle` and reads as

    run = lifecycle.open_run("pretrain", "Pretraining", loop_args)   # the Accelerator and the run folder's layout
    ... its own inputs: load and check everything, build the model and the datasets ...
    prepared = lifecycle.prepare(run, model, train_loader, eval_loader, fingerprint=..., config=..., summary=...)
    before = lifecycle.evaluate_before(prepared, scores, enabled)   # step 0, on a fresh run
    after = lifecycle.train(prepared, eval_fn)          # train_loop; the final evaluation's values
    model_dir, adapter_dir = lifecycle.finish(prepared, tokenizer, card=..., json_files=..., report=...)

Nothing is written into the output folder before `prepare`: every input is checked first, and
`prepare` is the one place that decides whether the folder may hold this run (`check_run_folder`)
and then claims it (its lock, `record_run`). It also builds the optimizer, wraps everything with
`accelerator.prepare`, resumes from the latest checkpoint and starts the trackers. `finish` is
the shared ending: the loss curve, the model folder with its card (and a LoRA adapter), the JSON
results, the report and a clean shutdown of every process.

Fine-tuning jobs start from a saved folder (`BaseModelArguments`, `load_base_tokenizer`,
`load_base_model`, `max_length_for`, `fine_tuning_fingerprint`), and those tuned on prompts and
answers (SFT, DPO, GRPO) share where their records come from (`InstructionDataArguments`), their
opening and their ending too:

    run, tokenizer, model, max_length = lifecycle.open_fine_tuning("sft", "SFT", args, loop_args, args.max_length)
    ... prepare as above ...
    after, detail = lifecycle.train_on_heldout(prepared, args, scores, heldout_records)   # train_and_evaluate
    return lifecycle.finish_fine_tuning(prepared, tokenizer, before=..., after=..., totals=..., card=...,
                                        json_files=..., report=...)    # a FineTuningResult
"""

from __future__ import annotations

import atexit
import functools
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast, set_seed
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from modeling_minigpt.files import atomic_write_json, save_figure
from tokenization.alpaca import ALPACA_CHAT_TEMPLATE
from tokenization.corpus import DataError
from tokenization.load import check_tokenizer, load_tokenizer, tokenizer_fingerprint
from training.data.instructions import RecordSplits, file_splits
from training.data.tasks import TASK_KINDS
from training.data.windows import source_identity
from training.evaluation.generate import check_generation_room, eval_mode
from training.run import zero
from training.run.accelerator import choose_attention, compile_for_training, make_accelerator
from training.run.arguments import LoopArguments
from training.run.checkpoint import Resumable, check_supported
from training.run.distributed import RankBatches, check_can_shard, shard_for_training, unsharded
from training.run.folder import (
    RunFolderError,
    RunLock,
    check_lock,
    check_output_location,
    check_run_folder,
    has_complete_checkpoint,
    record_run,
    recover_interrupted_overwrite,
    replace_run,
    restore_replaced,
    retire_replaced,
    run_entries,
)
from training.run.loop import (
    LossFn,
    MetricsLog,
    TrainState,
    causal_lm_loss,
    log_metrics,
    resume_from_latest,
    start_trackers,
    train_loop,
)
from training.run.optim import describe_optimizer, make_optimizer
from training.run.schedule import describe_schedule
from training.saved.card import TrainingInfo, describe_hardware
from training.saved.layout import RunLayout, describe_run_files
from training.saved.load import TRUST_HELP, Task, load_model, read_model_config
from training.saved.outputs import check_apart, named_inputs
from training.saved.plots import LOSS_CURVE_DPI, loss_curve_figure
from training.saved.save import is_peft_model, save_finetuned

# A job's evaluation: (the numbers logged to metrics.jsonl, whatever else it found, e.g. generations).
Scores = Callable[[torch.nn.Module], tuple[dict[str, float], Any]]


# ----------------------------------------------------------------------------- the run fingerprint


def file_identity(path: str | os.PathLike[str] | None) -> dict[str, Any] | str | None:
    """What identifies a data source for a resume fingerprint: `training.data.windows.source_identity`'s
    record (a file's path, size and SHA-256, so a file edited in place, even at the same size, is
    another source; a folder's files each so; a dataset name or the embedded corpus as given).
    None stays None."""
    return None if path is None else source_identity(path).record


def model_identity(model_dir: Path) -> dict[str, Any]:
    """What identifies a saved base model: its config and weight files, by content."""
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
        "divergence_loss",
        # the same computation as eager up to float rounding: a run may be resumed with or without it,
        # and runs recorded before the flag existed resume
        "compile",
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

    model_path: str | None = field(
        default=None,
        metadata={
            "help": "Saved causal LM folder to start from (MiniGPT, or GPT-2 converted by "
            "scripts/convert_gpt2.py). Required."
        },
    )
    tokenizer_path: str | None = field(default=None, metadata={"help": "Tokenizer folder. Default: the model folder."})
    trust_remote_code: bool = field(default=False, metadata={"help": TRUST_HELP})


@dataclass
class HeldoutEvalArguments:
    """How a fine-tuning job evaluates on its held-out records (SFT examples, DPO pairs)."""

    eval_batch_size: int = field(
        default=16, metadata={"help": "Held-out records per evaluation / prompts per generation batch, per process."}
    )
    eval_generations: int | None = field(
        default=None,
        metadata={
            "help": "Held-out prompts answered at each periodic evaluation (0: none). Default: all "
            "(before and after training always all)."
        },
    )
    max_new_tokens: int = field(default=48, metadata={"help": "Tokens generated at most per held-out answer."})
    eval_before_training: bool = field(
        default=True, metadata={"help": "Evaluate the untuned model first (logged at step 0): the 'before' numbers."}
    )

    def check_evaluation(self) -> None:
        """ValueError naming the flag of a bad evaluation setting (called by the job's `__post_init__`)."""
        for name in ("eval_batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_generations is not None and self.eval_generations < 0:
            raise ValueError(f"--eval_generations must be >= 0, got {self.eval_generations}")

    def periodic(self, records: Sequence[Any]) -> Sequence[Any]:
        """The held-out records answered at each periodic evaluation."""
        return records[: self.eval_generations] if self.eval_generations is not None else records


# The embedded seeded tasks of a job: (num_train, num_heldout, seed, kinds) -> (train, held-out) records.
MakeTasks = Callable[[int, int, int, list[str]], tuple[list[dict[str, str]], list[dict[str, str]]]]


@dataclass
class InstructionDataArguments:
    """Where a job tuned on prompts and answers (SFT, DPO, GRPO) gets its records: files, or else the
    embedded seeded tasks (`training.data.tasks`). Each job adds its task counts under its own names
    (the flags differ: DPO's are pairs), and restates the help of a field it has more to say about
    (DPO's records are pairs, GRPO's rewards read the expected answers)."""

    train_file: str | None = field(
        default=None,
        metadata={
            "help": "Alpaca records (instruction, input, output): a .json array, .jsonl, .csv or .parquet file, a "
            "save_to_disk folder or a dataset name. Default: the embedded seeded instruction tasks (no download)."
        },
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "Held-out Alpaca records. Default: hold out part of train_file."}
    )
    validation_fraction: float = field(
        default=0.1,
        metadata={"help": "Share of train_file records held out (seeded) when there is no validation_file."},
    )
    task_kinds: list[str] = field(
        default_factory=lambda: list(TASK_KINDS),
        metadata={"help": f"Embedded tasks: kinds to draw from ({', '.join(TASK_KINDS)})."},
    )
    data_seed: int = field(
        default=0, metadata={"help": "Seed of the embedded tasks and of the held-out split of train_file."}
    )

    def check_data(self, *counts: str) -> None:
        """ValueError naming the flag of a bad data setting, `counts` (the job's task count fields)
        included (called by the job's `__post_init__`)."""
        if not 0 < self.validation_fraction < 1:
            raise ValueError(f"--validation_fraction must be in (0, 1), got {self.validation_fraction}")
        for name in counts:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.train_file is None and self.validation_file is not None:
            raise ValueError(
                "--validation_file needs a --train_file (the embedded tasks make their own held-out split)"
            )

    def load_splits(
        self,
        read_file: Callable[[str], list[dict[str, str]]],
        make_tasks: MakeTasks,
        num_train: int,
        num_heldout: int,
        what: str,
    ) -> RecordSplits:
        """The training and held-out records: train_file's, read by `read_file` (validation_file's
        held out, or a seeded share of train_file's), or else `num_train` and `num_heldout` of the
        embedded `what` made by `make_tasks`."""
        if self.train_file is None:
            train, heldout = make_tasks(num_train, num_heldout, self.data_seed, self.task_kinds)
            return RecordSplits(train, heldout, f"{what} ({', '.join(self.task_kinds)}), seed {self.data_seed}")
        return file_splits(read_file, self.train_file, self.validation_file, self.validation_fraction, self.data_seed)

    def data_fingerprint(self, *settings: str) -> dict[str, Any]:
        """The data part of a run fingerprint: the files by content, and how the records are drawn
        (the job's own `settings` too: its task counts, ...)."""
        drawn = ("validation_fraction", "task_kinds", "data_seed", *settings)
        return {
            "train_file": file_identity(self.train_file),
            "validation_file": file_identity(self.validation_file),
            **{name: getattr(self, name) for name in drawn},
        }


def load_base_tokenizer(args: BaseModelArguments) -> PreTrainedTokenizerBase:
    """The tokenizer saved with the base model (or at `tokenizer_path`), ready to pad.

    A tokenizer without a pad token pads with eos: padded positions are masked out of attention
    and loss, so the id does not matter.
    """
    read_model_config(args.model_path, "--model_path")
    tokenizer = load_tokenizer(args.tokenizer_path or args.model_path, trust_remote_code=args.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(
    args: BaseModelArguments, task: Task, tokenizer: PreTrainedTokenizerBase, seed: int, **kwargs: Any
) -> Any:
    """The base model with a `task` head (`training.saved.load.load_model`: the package's own
    classes, no code from the folder), seeded (new heads and LoRA's matrices start the same in
    every rerun) and checked against `tokenizer`."""
    set_seed(seed)
    model = load_model(
        args.model_path, task, trust_remote_code=args.trust_remote_code, what="--model_path", trained=True, **kwargs
    )
    check_tokenizer(tokenizer, model.config.vocab_size)
    if isinstance(args, HeldoutEvalArguments):  # its answers are generated before and during training
        check_generation_room(args.max_new_tokens, model.config.max_position_embeddings, "--max_new_tokens")
    return model


def max_length_for(model: Any, requested: int | None) -> int:
    """Tokens per example: `requested` (--max_length), at most the model's context length (its default)."""
    if requested is not None and requested < 1:  # 0 would read as "the default", -5 reach the tokenizer
        raise ValueError(f"--max_length must be >= 1 (or left out for the model's context length), got {requested}")
    context_length = model.config.max_position_embeddings
    return min(requested or context_length, context_length)


class FineTuningStart(NamedTuple):
    """What `open_fine_tuning` gives a job: its run, the base tokenizer and model, the tokens per sequence."""

    run: Run
    tokenizer: PreTrainedTokenizerBase
    model: Any
    max_length: int


def open_fine_tuning(
    project: str, title: str, args: BaseModelArguments, loop_args: LoopArguments, max_length: int | None
) -> FineTuningStart:
    """The opening of a job that tunes a saved causal LM on prompts and answers (SFT, DPO): `open_run`,
    the base tokenizer (given the Alpaca chat template when it has none, e.g. one from elsewhere: the
    model is saved with the template it was trained on), the base model seeded with `loop_args.seed`
    (LoRA's initial A matrices start the same in every rerun), and the tokens per sequence
    (`max_length`, at most the model's context length)."""
    run = open_run(project, title, loop_args, args)
    tokenizer = load_base_tokenizer(args)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = ALPACA_CHAT_TEMPLATE
    model = load_base_model(args, "causal-lm", tokenizer, loop_args.seed)
    return FineTuningStart(run, tokenizer, model, max_length_for(model, max_length))


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


def open_run(project: str, title: str, loop_args: LoopArguments, *inputs: Any) -> Run:
    """The run's Accelerator and folder layout. Writes nothing, and refuses early what needs no
    data to be refused: no --output_dir, an output folder that is, contains or lies inside one of
    the job's inputs (the paths its argument objects `inputs` name, `training.saved.outputs`), an
    output path that cannot be a writable folder, a folder another run is writing or that holds a
    run without --resume/--overwrite, a launch whose processes do not form one run, a setup the
    checkpoints cannot hold."""
    if not loop_args.output_dir:
        raise ValueError("--output_dir is required: the folder for checkpoints, logs and the final model")
    check_apart({"--output_dir": loop_args.output_dir}, named_inputs(*inputs))
    layout = RunLayout(Path(loop_args.output_dir))
    check_output_location(layout.root)
    check_run_folder(layout.root, None, resume=loop_args.resume, overwrite=loop_args.overwrite)
    accelerator = make_accelerator(loop_args)
    if accelerator.is_main_process:  # the others would see their own main process's lock
        check_lock(layout.root)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise RunFolderError(
            f"the launcher started {launched} processes (WORLD_SIZE={launched}) but this one runs alone, so each would "
            "write the same folder: on a machine without GPUs launch with ACCELERATE_USE_CPU=1 (see README)"
        )
    check_supported(accelerator, loop_args)
    return Run(project, title, loop_args, accelerator, layout)


class _Claim:
    """The main process's hold on the run folder: its lock, and the run an --overwrite set aside
    (`training.run.folder`). `abandon` undoes what a failed run must not leave behind."""

    def __init__(self, run: Run):
        self.run = run
        self.lock = RunLock(run.layout.root, say=print) if run.is_main else None
        self.replaced = False

    def claim(self, fingerprint: dict[str, Any], config: dict[str, Any]) -> None:
        args, root = self.run.args, self.run.layout.root
        self.lock.acquire()
        atexit.register(self.abandon)  # a failure outside the lifecycle's own calls, or any exit
        recover_interrupted_overwrite(root, say=print)
        check_run_folder(root, fingerprint, resume=args.resume, overwrite=args.overwrite)
        if args.overwrite and run_entries(root):
            replace_run(root)
            self.replaced = True
        if not (args.resume and self.run.layout.run_config.is_file()):  # a resumed run keeps its record
            record_run(root, fingerprint, config)

    def checkpointed(self) -> None:
        """The run has a complete checkpoint: it is safely started, the run it replaced can go."""
        if self.replaced:
            retire_replaced(self.run.layout.root)
            self.replaced = False

    def abandon(self) -> None:
        """After a failure: put a replaced run back unless this one got a complete checkpoint; release the lock."""
        if self.lock is None:
            return
        root = self.run.layout.root
        if self.replaced and not has_complete_checkpoint(root):
            restore_replaced(root)
            print(f"the run did not reach its first checkpoint: restored the run it was replacing in {root}")
        self.replaced = False
        self.release()

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            atexit.unregister(self.abandon)
            self.lock = None


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
    claim: _Claim


def _abandons_on_error(function: Callable[..., Any]) -> Callable[..., Any]:
    """A lifecycle step that, failing, abandons the run's claim on its folder (see `_Claim.abandon`)."""

    @functools.wraps(function)
    def step(prepared: PreparedRun, *args: Any, **kwargs: Any) -> Any:
        try:
            return function(prepared, *args, **kwargs)
        except BaseException:
            prepared.claim.abandon()
            raise

    return step


def check_batches(
    train_loader: DataLoader | RankBatches, eval_loader: DataLoader, accumulation: int = 1, num_processes: int = 1
) -> None:
    """DataError unless the training data gives at least one full batch that collates, each process
    at least `accumulation` batches per epoch (one optimizer step; more would accumulate over
    repeated data, for a long time with no step and no word), and the evaluation data is not
    empty: found before the folder is touched, not at the first step."""
    if isinstance(train_loader, RankBatches):
        pass  # a stream is not read ahead here: the loop stops with an error if no rank gets a batch
    elif len(train_loader) == 0:
        raise DataError(
            f"the training data gives no batch: {len(train_loader.dataset)} examples, fewer than one batch of "
            f"--per_device_batch_size {train_loader.batch_size} (incomplete batches are dropped). "
            "Use more data or a smaller batch"
        )
    else:
        per_process = len(train_loader) // num_processes
        if per_process < accumulation:
            raise DataError(
                f"--gradient_accumulation_steps {accumulation:,} needs {accumulation:,} batches per optimizer step, "
                f"but the training data gives {per_process:,} per epoch on each of {num_processes} process(es) "
                f"({len(train_loader.dataset):,} examples, --per_device_batch_size {train_loader.batch_size}): "
                f"use at most {per_process:,}, or more data"
            )
        train_loader.collate_fn([train_loader.dataset[i] for i in range(train_loader.batch_size)])
    if len(eval_loader.dataset) == 0:
        raise DataError("the held-out (evaluation) data is empty: every held-out example was dropped or there is none")


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
    """The first write. Checks that a batch can be built, then the main process locks the folder,
    checks it may hold this run, sets an old run aside for --overwrite and records this one
    (`training.run.folder`); then the optimizer over the trainable parameters, `accelerator.prepare`,
    the resume and the trackers. Every process calls it. With `shard`, the model is sharded with
    FSDP2 (`training.run.distributed.shard_for_training`) instead of wrapped in DDP."""
    args, accelerator = run.args, run.accelerator
    if shard:
        check_can_shard(accelerator)
    check_batches(train_loader, eval_loader, args.gradient_accumulation_steps, accelerator.num_processes)
    claim = _Claim(run)
    failure: BaseException | None = None
    if run.is_main:
        try:
            claim.claim(fingerprint, config)
        except BaseException as error:
            claim.abandon()
            failure = error
    if accelerator.num_processes > 1:  # the others learn whether the main process claimed the folder
        flag = torch.tensor([failure is not None], device=accelerator.device)
        if broadcast(flag, from_process=0).item() and failure is None:
            failure = RunFolderError(f"the main process could not claim {run.layout.root}: see its error")
    if failure is not None:
        raise failure
    if run.is_main:
        print("resolved configuration:")
        print(json.dumps(config, indent=2, sort_keys=True, default=str))
        print(summary)
        print(f"outputs: {run.layout.root.resolve()}")
        print(describe_run_files())
    try:
        choose_attention(model, args, accelerator)
        if shard:  # before the optimizer, which must hold the sharded parameters
            model = shard_for_training(accelerator, model)
        optimizer = make_optimizer(model, args, accelerator.device)
        if zero.is_deepspeed(accelerator):
            described = zero.configure_deepspeed(accelerator, args)
            if run.is_main:
                print(described)
        if not shard:  # a sharded model is not wrapped in DDP; the checkpoint gathers its state whole
            model, optimizer = accelerator.prepare(model, optimizer)
        if run.is_main:
            print(f"optimizer: {describe_optimizer(args, accelerator.device)}")
        eval_loader = accelerator.prepare(eval_loader)
        if isinstance(train_loader, DataLoader):  # a stream split by rank (`RankBatches`) would be split again
            train_loader = accelerator.prepare(train_loader)
        state = TrainState()
        metrics = MetricsLog(run.layout.metrics, enabled=run.is_main)
        parts = Resumable(model, optimizer, state, [train_loader])
        resumed_at = resume_from_latest(accelerator, run.layout.root, metrics, parts) if args.resume else None
        if run.is_main and args.resume:
            print(
                f"resuming from step {resumed_at}"
                if resumed_at is not None
                else "no checkpoint yet: starting from step 0"
            )
        flat = {f"{section}.{key}": value for section, values in config.items() for key, value in values.items()}
        start_trackers(accelerator, run.project, flat, resumed_at)
    except BaseException:
        claim.abandon()
        raise
    return PreparedRun(run, model, optimizer, train_loader, eval_loader, state, metrics, resumed_at, claim)


@_abandons_on_error
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


def evaluate_before_on_heldout(
    prepared: PreparedRun,
    scores: Callable[[torch.nn.Module, Sequence[Any]], tuple[dict[str, float], Any]],
    records: Sequence[Any],
    enabled: bool,
) -> tuple[dict[str, float] | None, Any]:
    """`evaluate_before` for a job that answers held-out `records` (DPO, GRPO): (the untuned model's
    numbers, its answers), measured on a fresh run (the answers kept in
    heldout_generations_before.json for a resumed run), read back by a resumed one."""
    run = prepared.run
    first = LastEvaluation(lambda model: scores(model, records))
    before = evaluate_before(prepared, lambda model: (first(model), first.detail), enabled)
    if first.detail is not None:  # measured now, on a fresh run
        if run.is_main:
            atomic_write_json(run.layout.generations_before, first.detail)
        return before, first.detail
    saved = run.layout.generations_before
    return before, json.loads(saved.read_text(encoding="utf-8")) if saved.is_file() else None


@_abandons_on_error
def train(
    prepared: PreparedRun,
    eval_fn: Callable[[torch.nn.Module], Mapping[str, Any]] | None,
    loss_fn: LossFn = causal_lm_loss,
) -> dict[str, Any] | None:
    """`train_loop` on the prepared run, redrawing the loss curve after every evaluation; returns
    the values of the final evaluation (None when the loop had nothing left to do).

    With --compile the model is compiled here, after the evaluation before training: its first
    compiled graph is then the training step's in a fresh and in a resumed run alike (evaluations
    and samples, compiled later, vary shapes and would otherwise make the training graph dynamic
    in one run and static in the other: same losses, different last bits)."""
    compile_for_training(prepared.model, prepared.run.args, prepared.run.accelerator)
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
        on_checkpoint=lambda state: prepared.claim.checkpointed(),
    )


def train_and_evaluate(
    prepared: PreparedRun, scores: Scores, periodic: Scores | None = None, loss_fn: LossFn = causal_lm_loss
) -> tuple[dict[str, float], Any]:
    """`train`, evaluating with `periodic` (default: `scores`) every eval_every steps; then the trained
    model's (numbers, detail) by `scores`: the loop's final evaluation when that was `scores` (it
    does not run twice), else measured now."""
    evaluation = LastEvaluation(periodic or scores)
    after = train(prepared, evaluation, loss_fn)
    if after is not None and periodic is None:
        return after, evaluation.detail
    return scores(prepared.model)


def train_on_heldout(
    prepared: PreparedRun,
    args: HeldoutEvalArguments,
    scores: Callable[[torch.nn.Module, Sequence[Any]], tuple[dict[str, float], Any]],
    records: Sequence[Any],
    loss_fn: LossFn = causal_lm_loss,
) -> tuple[dict[str, float], Any]:
    """`train_and_evaluate` for a job scored on held-out `records` (SFT, DPO): each periodic
    evaluation answers `args.periodic(records)`, the final one every record."""
    periodic = args.periodic(records)
    every = (lambda model: scores(model, periodic)) if len(periodic) < len(records) else None
    return train_and_evaluate(prepared, lambda model: scores(model, records), every, loss_fn)


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


@_abandons_on_error
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
    # A sharded one gathered to the main process.
    if zero.is_deepspeed(run.accelerator):
        unwrapped = run.accelerator.unwrap_model(prepared.model)
        model = zero.gather_full_model(unwrapped, prepared.optimizer, run.is_main)
        zero.stop_building_partitioned()
    else:
        model = unsharded(run.accelerator.unwrap_model(prepared.model))
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
    prepared.claim.checkpointed()  # a run that resumed at its last step saved no new checkpoint
    prepared.claim.release()
    return run.layout.model, adapter


@dataclass
class FineTuningResult:
    """What a fine-tuning job scored on held-out records returns (SFT, DPO); final_metrics.json holds
    the same numbers."""

    output_dir: Path
    model_dir: Path
    adapter_dir: Path | None  # LoRA runs: the adapter alone
    before: dict[str, float] | None  # the untuned model's held-out numbers (None: not measured)
    after: dict[str, float]
    steps: int
    train_seconds: float


def finish_fine_tuning(
    prepared: PreparedRun,
    tokenizer: PreTrainedTokenizerBase,
    *,
    before: dict[str, float] | None,
    after: dict[str, float],
    totals: Mapping[str, Any],
    card: Mapping[str, Any],
    json_files: Mapping[Path, Any],
    report: str,
    extra_files: Sequence[Path] = (),
) -> FineTuningResult:
    """`finish` for a fine-tuning job: final_metrics.json holds `before`, `after`, the run's totals
    (`run_totals`) and the job's own `totals`, beside its other `json_files`."""
    layout = prepared.run.layout
    final = {"before": before, "after": after, **run_totals(prepared), **totals}
    model_dir, adapter_dir = finish(
        prepared,
        tokenizer,
        card=card,
        json_files={**json_files, layout.final_metrics: final},
        report=report,
        extra_files=extra_files,
    )
    return FineTuningResult(layout.root, model_dir, adapter_dir, before, after, final["steps"], final["train_seconds"])
