"""Instruction fine-tuning (SFT) of a saved causal LM: the job behind `scripts/sft.py`.

`run_sft(sft_args, lora_args, loop_args)` loads a saved MiniGPT folder (or a converted GPT-2
folder) and its tokenizer, renders Alpaca records to (ids, labels) with the loss on the response
only (`training.instruct_data`), and trains with the shared loop (`training.loop.train_loop`):
full fine-tuning or LoRA adapters. Without a data file it uses the project's own seeded
instruction tasks (`training.tasks`), whose answers can be checked exactly.

Evaluation, before training, every `eval_every` steps and at the end:
- `val_loss`: the response-token loss on the held-out records (always response-only, also in a
  run trained with the loss on every token, so the two runs compare);
- `val_exact_match`: greedy answers to held-out prompts compared with the expected output;
- at the end, `heldout_generations.json`: one {instruction, input, expected, generated,
  exact_match} object per held-out record, the same shape for any Alpaca data, for a person or
  a judge model to score.

Output folder: `model/` (weights, code, tokenizer with its chat template, model card; LoRA
runs save the merged model here), `adapter/` (LoRA runs: the adapter alone, for
`PeftModel.from_pretrained(base, adapter_dir)`), checkpoints for `--resume`, metrics.jsonl, the
loss curve and `final_metrics.json`.

The module also holds the pieces `training.classify` shares with it: loading the base
tokenizer, seeded splits, the resume fingerprint and the run setup around `train_loop`.
"""

from __future__ import annotations

import contextlib
import json
import random
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

import modeling_minigpt  # noqa: F401  (registers MiniGPT with the Auto classes)
from tokenization.alpaca import ALPACA_CHAT_TEMPLATE, format_prompt
from modeling_minigpt.files import atomic_write_json, save_figure
from training.checkpoint import check_run_folder, start_run_folder
from tokenization.load import check_tokenizer, load_tokenizer, tokenizer_fingerprint
from training.evaluate import evaluate_loss
from training.instruct_data import (
    build_instruction_dataset,
    collate_instruction_batch,
    encode_prompt,
    load_instruction_records,
    pad_sequences,
)
from training.lora import LoraArguments, apply_lora, save_finetuned, trainable_parameter_counts
from training.loop import (
    LOSS_CURVE_FILE,
    METRICS_FILE,
    LoopArguments,
    MetricsLog,
    TrainState,
    build_optimizer,
    describe_schedule,
    file_identity,
    log_metrics,
    make_accelerator,
    make_train_dataloader,
    optimization_fingerprint,
    resume_from_latest,
    start_trackers,
    train_loop,
)
from training.model_card import TrainingInfo, describe_hardware
from training.plots import LOSS_CURVE_DPI, loss_curve_figure
from training.tasks import TASK_KINDS, exact_match, make_task_splits

MODEL_DIR = "model"
ADAPTER_DIR = "adapter"
FINAL_METRICS_FILE = "final_metrics.json"
GENERATIONS_FILE = "heldout_generations.json"


@dataclass
class SFTArguments:
    """The base model, the instruction data and how to evaluate."""

    model_path: str = field(default=None, metadata={"help": "Saved causal LM folder to fine-tune (MiniGPT, or GPT-2 converted by scripts/convert_gpt2.py). Required."})
    tokenizer_path: str | None = field(default=None, metadata={"help": "Tokenizer folder. Default: the model folder."})
    train_file: str | None = field(
        default=None,
        metadata={"help": "Alpaca records (instruction, input, output) in a .json array, .jsonl or .csv. "
                  "Default: the embedded seeded instruction tasks (no download)."},
    )
    validation_file: str | None = field(default=None, metadata={"help": "Held-out Alpaca records. Default: hold out part of train_file."})
    validation_fraction: float = field(default=0.1, metadata={"help": "Share of train_file records held out (seeded) when there is no validation_file."})
    num_train_tasks: int = field(default=3000, metadata={"help": "Embedded tasks: training records."})
    num_heldout_tasks: int = field(default=120, metadata={"help": "Embedded tasks: held-out records (disjoint prompts)."})
    task_kinds: list[str] = field(default_factory=lambda: list(TASK_KINDS), metadata={"help": f"Embedded tasks: kinds to draw from ({', '.join(TASK_KINDS)})."})
    data_seed: int = field(default=0, metadata={"help": "Seed of the embedded tasks and of the held-out split of train_file."})
    max_length: int | None = field(default=None, metadata={"help": "Tokens per example (prompt + response + eos); longer responses are cut. Default: the model's context length."})
    mask_prompt: bool = field(default=True, metadata={"help": "Loss on the response tokens only (default). --mask_prompt false puts the loss on every token."})
    finetune: Literal["full", "lora"] = field(default="full", metadata={"help": "Train every weight (full) or LoRA adapters only (see the --lora_* options)."})
    eval_batch_size: int = field(default=16, metadata={"help": "Held-out examples per evaluation / generation batch, per process."})
    eval_generations: int | None = field(default=None, metadata={"help": "Held-out prompts answered at each periodic evaluation. Default: all (the final evaluation always uses all)."})
    max_new_tokens: int = field(default=48, metadata={"help": "Tokens generated at most per held-out answer."})
    eval_before_training: bool = field(default=True, metadata={"help": "Evaluate the untuned model first (logged at step 0): the 'before' numbers."})

    def __post_init__(self) -> None:
        if not 0 < self.validation_fraction < 1:
            raise ValueError(f"--validation_fraction must be in (0, 1), got {self.validation_fraction}")
        for name in ("num_train_tasks", "num_heldout_tasks", "eval_batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_generations is not None and self.eval_generations < 0:
            raise ValueError(f"--eval_generations must be >= 0, got {self.eval_generations}")


@dataclass
class SFTResult:
    output_dir: Path
    model_dir: Path
    adapter_dir: Path | None
    before: dict[str, float] | None  # val_loss / val_exact_match of the untuned model
    after: dict[str, float]
    steps: int
    train_seconds: float


# ----------------------------------------------------------------------------- shared with classification


def load_base_tokenizer(model_path: str, tokenizer_path: str | None) -> PreTrainedTokenizerBase:
    """The tokenizer saved with the base model (or at `tokenizer_path`), ready to pad.

    A tokenizer without a pad token pads with eos: padded positions are masked out of attention
    and loss, so the id does not matter.
    """
    tokenizer = load_tokenizer(tokenizer_path or model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_model_folder(path: str | None, flag: str = "--model_path") -> Path:
    if not path:
        raise ValueError(f"{flag} is required: a folder written by save_pretrained (e.g. a pretraining run's model/)")
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{flag} {folder} has no config.json: is it a save_pretrained folder?")
    return folder


def split_indices(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(kept, held_out) indices of n items: a seeded random `fraction` (at least one) is held out."""
    if n < 2:
        raise ValueError(f"need at least 2 records to hold some out, got {n}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_held = min(max(1, round(fraction * n)), n - 1)
    return sorted(order[n_held:]), sorted(order[:n_held])



def model_identity(model_dir: Path) -> dict[str, Any]:
    """What identifies a saved base model: its folder, config and weight files."""
    weights = sorted(p.name for p in model_dir.glob("*.safetensors")) or sorted(p.name for p in model_dir.glob("*.bin"))
    return {"config": file_identity(model_dir / "config.json"), "weights": [file_identity(model_dir / w) for w in weights]}




@dataclass
class PreparedRun:
    """Everything `train_loop` needs, after `accelerator.prepare` and an optional resume."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    train_loader: DataLoader
    eval_loader: DataLoader
    state: TrainState
    metrics: MetricsLog
    resumed_at: int | None  # the checkpoint's step, None for a fresh start


def prepare_run(
    accelerator: Accelerator,
    loop_args: LoopArguments,
    model: torch.nn.Module,
    train_loader: DataLoader,
    eval_loader: DataLoader,
    project_name: str,
    config: Mapping[str, Mapping[str, Any]],
) -> PreparedRun:
    """Optimizer over the trainable parameters, `accelerator.prepare`, resume, trackers."""
    optimizer = build_optimizer(model, loop_args.learning_rate, loop_args.weight_decay, (loop_args.adam_beta1, loop_args.adam_beta2))
    model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)
    state = TrainState()
    accelerator.register_for_checkpointing(state)
    metrics = MetricsLog(Path(loop_args.output_dir) / METRICS_FILE, enabled=accelerator.is_main_process)
    resumed_at = resume_from_latest(accelerator, loop_args.output_dir, metrics) if loop_args.resume else None
    if accelerator.is_main_process and loop_args.resume:
        print(f"resuming from step {resumed_at}" if resumed_at is not None else "no checkpoint yet: starting from step 0")
    flat = {f"{section}.{key}": value for section, values in config.items() for key, value in values.items()}
    start_trackers(accelerator, project_name, flat, resumed_at)
    return PreparedRun(model, optimizer, train_loader, eval_loader, state, metrics, resumed_at)


def require_output_dir(loop_args: LoopArguments) -> Path:
    if not loop_args.output_dir:
        raise ValueError("--output_dir is required: the folder for checkpoints, logs and the final model")
    return Path(loop_args.output_dir)


def start_output_folder(
    accelerator: Accelerator, loop_args: LoopArguments, fingerprint: dict[str, Any], config: dict[str, Any], summary: str
) -> None:
    """Check the output folder may hold this run, then record it (main process) and print the config."""
    check_run_folder(loop_args.output_dir, fingerprint, resume=loop_args.resume, overwrite=loop_args.overwrite)
    if accelerator.is_main_process:
        start_run_folder(loop_args.output_dir, fingerprint, config, overwrite=loop_args.overwrite)
        print("resolved configuration:")
        print(json.dumps(config, indent=2, sort_keys=True, default=str))
        print(summary)
        print(f"outputs: {Path(loop_args.output_dir).resolve()}")
    accelerator.wait_for_everyone()


def step0_metrics(metrics: MetricsLog) -> dict[str, Any] | None:
    """The evaluation logged before training (step 0), if there is one."""
    return next((r for r in metrics.records() if r["step"] == 0 and any(k.startswith("val_") for k in r)), None)


# ----------------------------------------------------------------------------- data


@dataclass
class InstructionSplits:
    train: list[dict[str, str]]
    heldout: list[dict[str, str]]  # keep extra keys (the task `kind`) for per-kind scores
    description: str


def load_instruction_splits(args: SFTArguments) -> InstructionSplits:
    """Training and held-out Alpaca records: from files, or the embedded tasks."""
    if args.train_file is None:
        if args.validation_file is not None:
            raise ValueError("--validation_file needs a --train_file (the embedded tasks make their own held-out split)")
        train, heldout = make_task_splits(args.num_train_tasks, args.num_heldout_tasks, args.data_seed, args.task_kinds)
        kinds = ", ".join(args.task_kinds)
        return InstructionSplits(train, heldout, f"embedded instruction tasks ({kinds}), seed {args.data_seed}")
    records = load_instruction_records(args.train_file)
    name = Path(args.train_file).name
    if args.validation_file is not None:
        return InstructionSplits(records, load_instruction_records(args.validation_file), name)
    kept, held = split_indices(len(records), args.validation_fraction, args.data_seed)
    return InstructionSplits([records[i] for i in kept], [records[i] for i in held], f"{name} (seeded {args.validation_fraction:.0%} held out)")


# ----------------------------------------------------------------------------- generation and scoring


@torch.no_grad()
def generate_answers(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[Mapping[str, str]],
    max_new_tokens: int,
    batch_size: int = 16,
    accelerator: Accelerator | None = None,
) -> list[str]:
    """Greedy answers to the records' prompts, in order, each cut at the first eos.

    Prompts are batched with LEFT padding so every row's last prompt token sits at the end and
    generation continues from it (the model derives positions from the attention mask). A
    prompt longer than `context_length - max_new_tokens` keeps its last tokens. With an
    `accelerator`, each process answers a contiguous share and all get the full list.
    `model` may be a MiniGPT, any HF causal LM or a PEFT model (not a DDP wrapper).
    """
    context_length = model.config.max_position_embeddings
    if not 0 < max_new_tokens < context_length:
        raise ValueError(f"max_new_tokens must be in [1, {context_length - 1}] for a {context_length}-token context, got {max_new_tokens}")
    room = context_length - max_new_tokens
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    indices = list(range(len(records)))
    answers: list[str] = []
    try:
        shard = accelerator.split_between_processes(indices) if accelerator is not None else contextlib.nullcontext(indices)
        with shard as mine:
            for start in range(0, len(mine), batch_size):
                prompts = [encode_prompt(tokenizer, records[i])[-room:] for i in mine[start : start + batch_size]]
                input_ids = pad_sequences(prompts, tokenizer.pad_token_id, side="left").to(device)  # (B, T)
                attention_mask = pad_sequences([[1] * len(p) for p in prompts], 0, side="left").to(device)
                output = model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id,
                )
                answers += [_decode_answer(tokenizer, row) for row in output[:, input_ids.shape[1] :].tolist()]
    finally:
        model.train(was_training)
    return gather_object(answers) if accelerator is not None and accelerator.num_processes > 1 else answers


def _decode_answer(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    if tokenizer.eos_token_id in ids:
        ids = ids[: ids.index(tokenizer.eos_token_id)]
    return tokenizer.decode(ids, skip_special_tokens=True)


def score_generations(records: Sequence[Mapping[str, str]], answers: Sequence[str]) -> list[dict[str, Any]]:
    """One {instruction, input, expected, generated, exact_match[, kind]} row per record."""
    rows = []
    for record, answer in zip(records, answers, strict=True):
        row = {
            "instruction": record["instruction"],
            "input": record.get("input") or "",
            "expected": record["output"],
            "generated": answer,
            "exact_match": exact_match(answer, record["output"]),
        }
        if "kind" in record:
            row["kind"] = record["kind"]
        rows.append(row)
    return rows


def exact_match_summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Overall exact match and, for task records, per kind (`exact_match_<kind>`)."""
    summary = {"val_exact_match": sum(r["exact_match"] for r in rows) / len(rows)}
    by_kind: dict[str, list[bool]] = defaultdict(list)
    for row in rows:
        if "kind" in row:
            by_kind[row["kind"]].append(row["exact_match"])
    summary.update({f"exact_match_{kind}": sum(hits) / len(hits) for kind, hits in sorted(by_kind.items())})
    return summary


# ----------------------------------------------------------------------------- the job


def run_sft(sft_args: SFTArguments, lora_args: LoraArguments, loop_args: LoopArguments) -> SFTResult:
    """Fine-tune, evaluate and save (see the module docstring); resumes with `loop_args.resume`."""
    model_dir = check_model_folder(sft_args.model_path)
    output_dir = require_output_dir(loop_args)
    accelerator = make_accelerator(loop_args)

    # --- 1. every check before anything is written ------------------------------------------
    tokenizer = load_base_tokenizer(sft_args.model_path, sft_args.tokenizer_path)
    if tokenizer.chat_template is None:  # e.g. a tokenizer from elsewhere: saved with the template we train on
        tokenizer.chat_template = ALPACA_CHAT_TEMPLATE
    set_seed(loop_args.seed)  # LoRA's initial A matrices
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True)
    check_tokenizer(tokenizer, model.config.vocab_size)
    context_length = model.config.max_position_embeddings
    max_length = min(sft_args.max_length or context_length, context_length)
    splits = load_instruction_splits(sft_args)
    with accelerator.main_process_first():
        train_set, train_stats = build_instruction_dataset(splits.train, tokenizer, max_length, sft_args.mask_prompt)
        # Held-out loss is always on the response only, so masked and unmasked runs compare.
        heldout_set, heldout_stats = build_instruction_dataset(splits.heldout, tokenizer, max_length, mask_prompt=True)
    if sft_args.finetune == "lora":
        model = apply_lora(model, lora_args, task_type="CAUSAL_LM")
    trainable, total = trainable_parameter_counts(model)

    fingerprint = {
        "base_model": {"path": str(model_dir.resolve()), **model_identity(model_dir)},
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "data": {
            "train_file": file_identity(sft_args.train_file),
            "validation_file": file_identity(sft_args.validation_file),
            **{k: getattr(sft_args, k) for k in ("validation_fraction", "num_train_tasks", "num_heldout_tasks", "task_kinds", "data_seed")},
        },
        "training": {"max_length": max_length, "mask_prompt": sft_args.mask_prompt, "finetune": sft_args.finetune,
                     "lora": asdict(lora_args) if sft_args.finetune == "lora" else None},
        "optimization": optimization_fingerprint(loop_args),
    }
    config = {"sft": asdict(sft_args), "lora": asdict(lora_args), "loop": asdict(loop_args)}
    summary = (
        f"data: {splits.description}\n  train: {train_stats}\n  held-out: {heldout_stats}\n"
        f"trainable parameters: {trainable:,} of {total:,} ({trainable / total:.2%}); processes: {accelerator.num_processes}"
    )
    start_output_folder(accelerator, loop_args, fingerprint, config, summary)

    # --- 2. data loaders, prepare, resume --------------------------------------------------
    collate = partial(collate_instruction_batch, pad_token_id=tokenizer.pad_token_id)
    train_loader = make_train_dataloader(train_set, loop_args.per_device_batch_size, collate, loop_args.seed)
    heldout_loader = DataLoader(heldout_set, batch_size=sft_args.eval_batch_size, collate_fn=collate)
    run = prepare_run(accelerator, loop_args, model, train_loader, heldout_loader, "sft", config)
    periodic = splits.heldout[: sft_args.eval_generations] if sft_args.eval_generations is not None else splits.heldout

    def evaluate(model: torch.nn.Module, records: Sequence[Mapping[str, str]]) -> tuple[dict[str, float], list[dict[str, Any]]]:
        values = {"val_loss": evaluate_loss(model, run.eval_loader, accelerator).loss}
        if not records:
            return values, []
        answers = generate_answers(accelerator.unwrap_model(model), tokenizer, records, sft_args.max_new_tokens, sft_args.eval_batch_size, accelerator)
        rows = score_generations(records, answers)
        return {**values, **exact_match_summary(rows)}, rows

    def on_eval(state: TrainState) -> None:
        save_figure(loss_curve_figure(run.metrics.records(), title=f"SFT {output_dir.name}"), output_dir / LOSS_CURVE_FILE, dpi=LOSS_CURVE_DPI)

    if sft_args.eval_before_training and run.resumed_at is None:
        before, _ = evaluate(run.model, splits.heldout)  # the same records as the final evaluation
        log_metrics(accelerator, run.metrics, 0, {"tokens": 0, **before})
        if accelerator.is_main_process:
            print("before training: " + "  ".join(f"{k}={v:.4f}" for k, v in before.items()))

    # --- 3. train, final evaluation on every held-out record, save -------------------------
    latest: dict[str, Any] = {}

    def eval_fn(model: torch.nn.Module) -> dict[str, float]:
        latest["values"], latest["rows"] = evaluate(model, periodic)
        return latest["values"]

    train_loop(accelerator, run.model, run.optimizer, run.train_loader, loop_args, run.state, run.metrics, eval_fn=eval_fn, on_eval=on_eval)
    if latest and len(periodic) == len(splits.heldout):
        after, rows = latest["values"], latest["rows"]  # the loop's final evaluation already covered every record
    else:
        with torch.no_grad():
            after, rows = evaluate(run.model, splits.heldout)
    before = step0_metrics(run.metrics)
    before = {k: v for k, v in before.items() if k.startswith(("val_", "exact_match_"))} if before else None
    adapter_dir = output_dir / ADAPTER_DIR if sft_args.finetune == "lora" else None
    if accelerator.is_main_process:
        atomic_write_json(output_dir / GENERATIONS_FILE, rows)
        final = {"before": before, "after": after, "steps": run.state.step, "tokens_seen": run.state.tokens_seen,
                 "train_seconds": run.state.train_seconds, "heldout_records": len(splits.heldout), "mask_prompt": sft_args.mask_prompt}
        atomic_write_json(output_dir / FINAL_METRICS_FILE, final)
        on_eval(run.state)
        card = _model_card(sft_args, loop_args, run.state, splits, after, len(train_set), accelerator.num_processes)
        save_finetuned(accelerator.unwrap_model(run.model), tokenizer, output_dir / MODEL_DIR, output_dir / ADAPTER_DIR,
                       card=card, extra_files=[output_dir / LOSS_CURVE_FILE])
        shown = lambda values: "  ".join(f"{k}={v:.4f}" for k, v in values.items())  # noqa: E731
        print(f"\nheld-out ({len(splits.heldout)} records), before: {shown(before) if before else 'not measured'}")
        print(f"held-out ({len(splits.heldout)} records), after:  {shown(after)}")
        print(f"generations: {output_dir / GENERATIONS_FILE}\nmodel saved to {output_dir / MODEL_DIR}"
              + (f" (adapter in {adapter_dir})" if adapter_dir else ""))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return SFTResult(output_dir, output_dir / MODEL_DIR, adapter_dir, before, after, run.state.step, run.state.train_seconds)


def _model_card(
    sft_args: SFTArguments, loop_args: LoopArguments, state: TrainState, splits: InstructionSplits,
    after: Mapping[str, float], n_train: int, num_processes: int,
) -> dict[str, Any]:
    loss = "response tokens only" if sft_args.mask_prompt else "every token"
    method = "LoRA adapters, merged" if sft_args.finetune == "lora" else "full fine-tuning"
    training: TrainingInfo = {
        "data": f"{splits.description}: {n_train:,} Alpaca-format examples, loss on {loss}, {method}",
        "tokens_seen": state.tokens_seen,
        "steps": state.step,
        "schedule": describe_schedule(loop_args, num_processes),
        "wall_time_seconds": state.train_seconds,
        "hardware": describe_hardware(num_processes),
    }
    evaluation = {"dataset_name": f"held-out records of {splits.description} (response-token loss)",
                  "dataset_split": "held-out", "val_loss": after["val_loss"]}
    return {"training_info": training, "eval_results": evaluation, "base_model": sft_args.model_path,
            "model_name": Path(loop_args.output_dir).resolve().name, "example_prompt": _example_prompt(splits)}


def _example_prompt(splits: InstructionSplits) -> str:
    record = splits.heldout[0]
    return format_prompt(record["instruction"], record.get("input"))
