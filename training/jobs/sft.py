"""Instruction fine-tuning (SFT) of a saved causal LM: the job behind `scripts/sft.py`.

`run_sft(sft_args, lora_args, loop_args)` loads a saved MiniGPT folder (or a converted GPT-2
folder) and its tokenizer, renders Alpaca records to (ids, labels) with the loss on the response
only (`training.data.instructions`), and trains through the run lifecycle of `training.run.lifecycle`: full
fine-tuning or LoRA adapters. Without a data file it uses the project's own seeded instruction
tasks (`training.data.tasks`), whose answers can be checked exactly. `--packing` packs each training
batch padding-free (`training.data.collate.collate_packed_instruction_batch`): the same loss, fewer
positions computed.

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
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from tokenization.alpaca import format_prompt
from training.data.collate import collate_instruction_batch, collate_packed_instruction_batch
from training.data.instructions import RecordSplits, build_instruction_dataset, load_instruction_records
from training.data.tasks import make_task_splits
from training.evaluation.generate import generate_answers
from training.evaluation.metrics import evaluate_loss, exact_match_summary, score_generations
from training.run import lifecycle
from training.run.arguments import LoopArguments
from training.run.loop import make_train_dataloader
from training.run.lora import LoraArguments, apply_lora, trainable_parameter_counts


@dataclass
class SFTArguments(lifecycle.InstructionDataArguments, lifecycle.HeldoutEvalArguments, lifecycle.BaseModelArguments):
    """The base model, the instruction data and how to evaluate."""

    num_train_tasks: int = field(default=3000, metadata={"help": "Embedded tasks: training records."})
    num_heldout_tasks: int = field(
        default=120, metadata={"help": "Embedded tasks: held-out records (disjoint prompts)."}
    )
    max_length: int | None = field(
        default=None,
        metadata={
            "help": "Tokens per example (prompt + response + eos); longer responses are cut. "
            "Default: the model's context length."
        },
    )
    mask_prompt: bool = field(
        default=True,
        metadata={
            "help": "Loss on the response tokens only (default). --mask_prompt false puts the loss on every token."
        },
    )
    packing: bool = field(
        default=False,
        metadata={
            "help": "Pack each training batch padding-free: its examples share rows of at most max_length tokens, "
            "kept apart by position ids that restart per example. Same examples and targets per step, so the "
            "same loss as padding; fewer positions to compute when examples are much shorter than max_length."
        },
    )
    finetune: Literal["full", "lora"] = field(
        default="full", metadata={"help": "Train every weight (full) or LoRA adapters only (see the --lora_* options)."}
    )

    def __post_init__(self) -> None:
        self.check_data("num_train_tasks", "num_heldout_tasks")
        self.check_evaluation()


# ----------------------------------------------------------------------------- generation and scoring


def heldout_scores(
    prepared: lifecycle.PreparedRun,
    tokenizer: PreTrainedTokenizerBase,
    args: SFTArguments,
    model: torch.nn.Module,
    records: Sequence[Mapping[str, str]],
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """(numbers, generation rows): the held-out response loss, and exact match of the answers to `records`."""
    accelerator = prepared.run.accelerator
    values = {"val_loss": evaluate_loss(model, prepared.eval_loader, accelerator).loss}
    if not records:
        return values, []
    answers = generate_answers(
        accelerator.unwrap_model(model), tokenizer, records, args.max_new_tokens, args.eval_batch_size, accelerator
    )
    rows = score_generations(records, answers)
    return {**values, **exact_match_summary(rows)}, rows


# ----------------------------------------------------------------------------- the job


def run_sft(sft_args: SFTArguments, lora_args: LoraArguments, loop_args: LoopArguments) -> lifecycle.FineTuningResult:
    """Fine-tune, evaluate and save (see the module docstring); resumes with `loop_args.resume`."""
    run, tokenizer, model, max_length = lifecycle.open_fine_tuning(
        "sft", "SFT", sft_args, loop_args, sft_args.max_length
    )
    splits = sft_args.load_splits(
        load_instruction_records,
        make_task_splits,
        sft_args.num_train_tasks,
        sft_args.num_heldout_tasks,
        "embedded instruction tasks",
    )
    with run.accelerator.main_process_first():
        train_set, train_stats = build_instruction_dataset(splits.train, tokenizer, max_length, sft_args.mask_prompt)
        # Held-out loss is always on the response only, so masked and unmasked runs compare.
        heldout_set, heldout_stats = build_instruction_dataset(splits.heldout, tokenizer, max_length, mask_prompt=True)
    if sft_args.finetune == "lora":
        model = apply_lora(model, lora_args, task_type="CAUSAL_LM")
    collate = partial(collate_instruction_batch, pad_token_id=tokenizer.pad_token_id)
    train_collate = (
        partial(collate_packed_instruction_batch, pad_token_id=tokenizer.pad_token_id, row_tokens=max_length)
        if sft_args.packing
        else collate
    )
    prepared = lifecycle.prepare(
        run,
        model,
        make_train_dataloader(train_set, loop_args.per_device_batch_size, train_collate, loop_args.seed),
        DataLoader(heldout_set, batch_size=sft_args.eval_batch_size, collate_fn=collate),
        fingerprint=_fingerprint(sft_args, lora_args, loop_args, tokenizer, max_length),
        config={"sft": asdict(sft_args), "lora": asdict(lora_args), "loop": asdict(loop_args)},
        summary=_summary(splits, train_stats, heldout_stats, model, run.accelerator.num_processes),
    )
    scores = partial(heldout_scores, prepared, tokenizer, sft_args)
    before = lifecycle.evaluate_before(prepared, partial(scores, records=splits.heldout), sft_args.eval_before_training)
    after, rows = lifecycle.train_on_heldout(prepared, sft_args, scores, splits.heldout)
    return lifecycle.finish_fine_tuning(
        prepared,
        tokenizer,
        before=before,
        after=after,
        totals={"heldout_records": len(splits.heldout), "mask_prompt": sft_args.mask_prompt},
        card=_model_card(prepared, sft_args, splits, after, len(train_set)),
        json_files={run.layout.generations: rows},
        report=_report(prepared, splits, before, after),
    )


def _fingerprint(
    sft_args: SFTArguments,
    lora_args: LoraArguments,
    loop_args: LoopArguments,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
) -> dict[str, Any]:
    return lifecycle.fine_tuning_fingerprint(
        sft_args,
        tokenizer,
        loop_args,
        lora_args,
        max_length,
        sft_args.data_fingerprint("num_train_tasks", "num_heldout_tasks"),
        mask_prompt=sft_args.mask_prompt,
        packing=sft_args.packing,
    )


def _summary(
    splits: RecordSplits, train_stats: Any, heldout_stats: Any, model: torch.nn.Module, num_processes: int
) -> str:
    trainable, total = trainable_parameter_counts(model)
    return (
        f"data: {splits.description}\n  train: {train_stats}\n  held-out: {heldout_stats}\n"
        f"trainable parameters: {trainable:,} of {total:,} ({trainable / total:.2%}); processes: {num_processes}"
    )


def _report(
    prepared: lifecycle.PreparedRun,
    splits: RecordSplits,
    before: Mapping[str, float] | None,
    after: Mapping[str, float],
) -> str:
    shown = lambda values: "  ".join(f"{k}={v:.4f}" for k, v in values.items())  # noqa: E731
    return (
        f"\nheld-out ({len(splits.heldout)} records), before: {shown(before) if before else 'not measured'}\n"
        f"held-out ({len(splits.heldout)} records), after:  {shown(after)}\n"
        f"generations: {prepared.run.layout.generations}"
    )


def _model_card(
    prepared: lifecycle.PreparedRun,
    sft_args: SFTArguments,
    splits: RecordSplits,
    after: Mapping[str, float],
    n_train: int,
) -> dict[str, Any]:
    loss = "response tokens only" if sft_args.mask_prompt else "every token"
    method = "LoRA adapters, merged" if sft_args.finetune == "lora" else "full fine-tuning"
    packed = ", batches packed padding-free" if sft_args.packing else ""
    data = f"{splits.description}: {n_train:,} Alpaca-format examples, loss on {loss}{packed}, {method}"
    evaluation = {
        "dataset_name": f"held-out records of {splits.description} (response-token loss)",
        "dataset_split": "held-out",
        "val_loss": after["val_loss"],
    }
    if "val_exact_match" in after:  # measured when the run has held-out records to answer
        evaluation["exact_match"] = after["val_exact_match"]
    return {
        "training_info": lifecycle.training_info(prepared, data),
        "eval_results": evaluation,
        "base_model": sft_args.model_path,
        "example_prompt": _example_prompt(splits),
    }


def _example_prompt(splits: RecordSplits) -> str:
    record = splits.heldout[0]
    return format_prompt(record["instruction"], record.get("input"))
