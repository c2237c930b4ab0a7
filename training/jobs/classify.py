"""Classification fine-tuning of a saved causal LM: the job behind `scripts/classify.py`.

`run_classification(cls_args, lora_args, loop_args)` loads a saved MiniGPT (or converted GPT-2)
folder as `MiniGPTForSequenceClassification`: the same decoder with a new linear head `score`
on the hidden state of each text's last real token. Label names and ids live in the config
(`id2label` / `label2id`), so the saved model predicts names and `pipeline("text-classification")`
works. Three ways to train (`--finetune`):

- `last_block` (the book's recipe, chapter 6): freeze everything, then train the last
  transformer block, the final LayerNorm and the new head. Cheap, and the pretrained features
  stay intact;
- `full`: every weight;
- `lora`: LoRA adapters on the linear layers plus the head (merged into the saved model).

Data: text,label records from anything `tokenization.corpus.read_records` reads (CSV, JSON/JSONL,
Parquet, a `datasets` save_to_disk folder, ...), or the embedded demo (the topic of a generated
sentence). Training goes through the run lifecycle of `training.run.lifecycle`. The job reports accuracy
and a confusion matrix on the validation and test splits (`final_metrics.json`, also printed).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, Sampler

from training.data.collate import collate_classification_batch
from training.data.labels import (
    TOPIC_WORDS,
    ClassificationData,
    ClassificationDataError,
    balanced_sampler,
    generate_classification_demo,
    load_classification_data,
    tokenize_classification_dataset,
)
from training.data.windows import split_indices
from training.evaluation.metrics import ClassificationReport, evaluate_classifier
from training.run import lifecycle
from training.run.arguments import LoopArguments
from training.run.loop import make_train_dataloader
from training.run.lora import LoraArguments, apply_lora, trainable_parameter_counts


@dataclass
class ClassifyArguments(lifecycle.BaseModelArguments):
    """The base model, the text/label data and how to fine-tune."""

    train_file: str | None = field(
        default=None,
        metadata={
            "help": "Text/label records: .csv, .json (array), .jsonl or .parquet, a datasets save_to_disk folder (of a "
            "DatasetDict: its 'train' split) or a dataset name. Default: the embedded topic demo (no download)."
        },
    )
    validation_file: str | None = field(
        default=None,
        metadata={
            "help": "Validation records (a DatasetDict folder: its 'validation' split). "
            "Default: hold out --validation_fraction of the training records."
        },
    )
    test_file: str | None = field(
        default=None,
        metadata={
            "help": "Test records (a DatasetDict folder: its 'test' split). "
            "Default: hold out --test_fraction of the training records (0 = no test split)."
        },
    )
    text_column: str = field(default="text", metadata={"help": "Column holding the text."})
    label_column: str = field(
        default="label", metadata={"help": "Column holding the label (a name, or an integer read as its name)."}
    )
    validation_fraction: float = field(
        default=0.1,
        metadata={"help": "Share of the training records held out for validation (seeded) without --validation_file."},
    )
    test_fraction: float = field(
        default=0.2,
        metadata={"help": "Share of the training records held out for testing (seeded) without --test_file."},
    )
    num_demo_examples: int = field(
        default=1000, metadata={"help": "Embedded demo: number of records before the splits."}
    )
    demo_label_weights: str | None = field(
        default=None,
        metadata={
            "help": "Embedded demo: relative label frequencies, e.g. 'animals=8,food=1,weather=1' "
            f"(labels: {', '.join(TOPIC_WORDS)}). Default: equal."
        },
    )
    data_seed: int = field(default=0, metadata={"help": "Seed of the demo data and of the held-out splits."})
    finetune: Literal["last_block", "full", "lora"] = field(
        default="last_block",
        metadata={
            "help": "last_block: the book's recipe (train the last block, final norm and head); "
            "full: every weight; lora: adapters + head."
        },
    )
    balanced_sampling: bool = field(
        default=False, metadata={"help": "Draw training examples so every class is equally likely (with replacement)."}
    )
    max_length: int | None = field(
        default=None,
        metadata={
            "help": "Tokens per text; longer texts keep their first tokens. Default: the model's context length."
        },
    )
    eval_batch_size: int = field(default=32, metadata={"help": "Texts per evaluation batch, per process."})
    eval_before_training: bool = field(
        default=True, metadata={"help": "Evaluate the untrained head first (logged at step 0)."}
    )

    def __post_init__(self) -> None:
        for name in ("validation_fraction", "test_fraction"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        if self.validation_file is None and self.validation_fraction == 0:
            raise ValueError("--validation_fraction must be > 0 without a --validation_file")
        if self.validation_fraction + self.test_fraction >= 1:
            raise ValueError(
                "--validation_fraction + --test_fraction must be < 1, "
                f"got {self.validation_fraction + self.test_fraction}"
            )
        if self.num_demo_examples < 3 or self.eval_batch_size < 1:
            raise ValueError("--num_demo_examples must be >= 3 and --eval_batch_size >= 1")


# ----------------------------------------------------------------------------- data


@dataclass
class ClassificationSplits:
    train: ClassificationData
    validation: ClassificationData
    test: ClassificationData | None
    description: str

    @property
    def label2id(self) -> dict[str, int]:
        return self.train.label2id


def parse_label_weights(text: str) -> dict[str, float]:
    """'animals=8,food=1' -> {'animals': 8.0, 'food': 1.0}."""
    weights = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise ValueError(f"--demo_label_weights: expected name=number items separated by commas, got {item!r}")
    return weights


def load_classification_splits(args: ClassifyArguments) -> ClassificationSplits:
    """Train, validation and (optional) test data, all with the training data's label ids.

    The label set is taken from all the training records (before any hold-out), so a split
    never lacks an id; validation/test files with a label outside it are an error listing the
    known labels.
    """
    columns = dict(text_column=args.text_column, label_column=args.label_column)
    if args.train_file is None:
        weights = parse_label_weights(args.demo_label_weights) if args.demo_label_weights else None
        source: Any = generate_classification_demo(args.num_demo_examples, args.data_seed, weights)
        description = f"embedded topic demo ({args.num_demo_examples} generated sentences, seed {args.data_seed})"
        data = load_classification_data(source)  # the demo's own column names
    else:
        data = load_classification_data(args.train_file, **columns)
        description = Path(args.train_file).name
    label2id = data.label2id
    if len(label2id) < 2:
        # One class would train a 1-output head, which transformers reads as regression (MSE loss).
        raise ClassificationDataError(
            f"--train_file {args.train_file}: every record has the label {next(iter(label2id), None)!r} "
            f"(column {args.label_column!r}); classification needs at least two classes"
        )

    held = {
        name: getattr(args, f"{name}_fraction")
        for name in ("validation", "test")
        if getattr(args, f"{name}_file") is None
    }
    held = {name: fraction for name, fraction in held.items() if fraction > 0}
    remaining = list(range(len(data.dataset)))
    taken: dict[str, list[int]] = {}
    for offset, (name, fraction) in enumerate(held.items()):
        # Fractions are of the whole training file; each split is drawn from what is left.
        kept, out = split_indices(
            len(remaining), fraction * len(data.dataset) / len(remaining), args.data_seed + offset
        )
        taken[name] = [remaining[i] for i in out]
        remaining = [remaining[i] for i in kept]

    def part(name: str) -> ClassificationData | None:
        path = getattr(args, f"{name}_file")
        if path is not None:
            return load_classification_data(path, label2id=label2id, split=name, **columns)
        if name in taken:
            return ClassificationData(data.dataset.select(taken[name]), label2id)
        return None

    if held:
        description += " with " + ", ".join(f"{fraction:.0%} held out for {name}" for name, fraction in held.items())
    return ClassificationSplits(
        ClassificationData(data.dataset.select(remaining), label2id), part("validation"), part("test"), description
    )


class EpochBalancedSampler(Sampler[int]):
    """Class-balanced sampling (`balanced_sampler`) whose draws are a function of (seed, epoch).

    The shared loop calls `set_epoch` before each epoch and relies on it for exact resume: a
    sampler with one long-lived generator would restart its stream after a resume.
    """

    def __init__(self, labels: Sequence[int], seed: int):
        self.labels, self.seed, self.epoch = list(labels), seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels)

    def __iter__(self) -> Iterator[int]:
        return iter(balanced_sampler(self.labels, seed=self.seed + self.epoch))


def make_classification_loader(dataset: Any, batch_size: int, collate: Any, seed: int, balanced: bool) -> DataLoader:
    """The training loader: the loop's shuffled loader, or class-balanced draws."""
    if not balanced:
        return make_train_dataloader(dataset, batch_size, collate, seed)
    sampler = EpochBalancedSampler(dataset["labels"], seed)
    # Its own generator, for the reason given in `make_train_dataloader`.
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=True,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(seed),
    )


# ----------------------------------------------------------------------------- model


def set_trainable(model: torch.nn.Module, mode: str, lora_args: LoraArguments) -> torch.nn.Module:
    """Apply the fine-tuning mode; returns the model to train (a PEFT wrapper for "lora")."""
    if mode == "lora":
        return apply_lora(model, lora_args, task_type="SEQ_CLS")  # PEFT also trains the head `score`
    if mode == "last_block":
        model.requires_grad_(False)
        for module in (model.model.trf_blocks[-1], model.model.final_norm, model.score):
            module.requires_grad_(True)
    elif mode != "full":
        raise ValueError(f"unknown fine-tuning mode {mode!r}; choose full, last_block or lora")
    return model


# ----------------------------------------------------------------------------- the job


@dataclass
class ClassificationResult:
    output_dir: Path
    model_dir: Path
    adapter_dir: Path | None
    before: dict[str, float] | None
    validation: ClassificationReport
    test: ClassificationReport | None
    steps: int


def run_classification(
    cls_args: ClassifyArguments, lora_args: LoraArguments, loop_args: LoopArguments
) -> ClassificationResult:
    """Fine-tune a classifier, evaluate on validation and test, save; resumes with `loop_args.resume`."""
    run = lifecycle.open_run("classify", "Classification", loop_args, cls_args)
    tokenizer = lifecycle.load_base_tokenizer(cls_args)
    splits = load_classification_splits(cls_args)
    labels = [name for name, _ in sorted(splits.label2id.items(), key=lambda item: item[1])]
    # The seed: the new head (and LoRA's A matrices) start the same in every rerun.
    head = dict(num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=splits.label2id)
    head["pad_token_id"] = tokenizer.pad_token_id
    model = lifecycle.load_base_model(cls_args, "sequence-classification", tokenizer, loop_args.seed, **head)
    max_length = lifecycle.max_length_for(model, cls_args.max_length)
    with run.accelerator.main_process_first():
        train_set, validation_set, test_set = (
            tokenize_classification_dataset(data.dataset, tokenizer, max_length) if data is not None else None
            for data in (splits.train, splits.validation, splits.test)
        )
    model = set_trainable(model, cls_args.finetune, lora_args)
    collate = partial(collate_classification_batch, pad_token_id=tokenizer.pad_token_id)
    batch_size, seed = loop_args.per_device_batch_size, loop_args.seed
    prepared = lifecycle.prepare(
        run,
        model,
        make_classification_loader(train_set, batch_size, collate, seed, cls_args.balanced_sampling),
        DataLoader(validation_set, batch_size=cls_args.eval_batch_size, collate_fn=collate),
        fingerprint=_fingerprint(cls_args, lora_args, loop_args, tokenizer, max_length, labels),
        config={"classify": asdict(cls_args), "lora": asdict(lora_args), "loop": asdict(loop_args)},
        summary=_summary(cls_args, splits, labels, model, run.accelerator.num_processes),
    )
    scores = partial(validation_scores, prepared, labels)
    before = lifecycle.evaluate_before(prepared, scores, cls_args.eval_before_training)
    _, validation = lifecycle.train_and_evaluate(prepared, scores)
    test = _test_report(prepared, test_set, collate, labels, cls_args.eval_batch_size)
    final = {"before": before, "validation": validation.to_dict(), "test": test.to_dict() if test else None}
    model_dir, adapter_dir = lifecycle.finish(
        prepared,
        tokenizer,
        card=_model_card(prepared, cls_args, splits, validation),
        json_files={run.layout.final_metrics: {**final, **lifecycle.run_totals(prepared)}},
        report=_report(before, validation, test),
    )
    return ClassificationResult(run.layout.root, model_dir, adapter_dir, before, validation, test, prepared.state.step)


def _test_report(
    prepared: lifecycle.PreparedRun, test_set: Any, collate: Any, labels: Sequence[str], batch_size: int
) -> ClassificationReport | None:
    """The trained classifier's report on the test split, if there is one."""
    if test_set is None:
        return None
    accelerator = prepared.run.accelerator
    test_loader = accelerator.prepare(DataLoader(test_set, batch_size=batch_size, collate_fn=collate))
    return evaluate_classifier(prepared.model, test_loader, labels, accelerator)


def validation_scores(
    prepared: lifecycle.PreparedRun, labels: Sequence[str], model: torch.nn.Module
) -> tuple[dict[str, float], ClassificationReport]:
    """(logged numbers, full report) of `model` on the validation set."""
    report = evaluate_classifier(model, prepared.eval_loader, labels, prepared.run.accelerator)
    return {"val_loss": report.loss, "val_accuracy": report.accuracy}, report


def _fingerprint(
    cls_args: ClassifyArguments,
    lora_args: LoraArguments,
    loop_args: LoopArguments,
    tokenizer: Any,
    max_length: int,
    labels: list[str],
) -> dict[str, Any]:
    files = ("train_file", "validation_file", "test_file")
    settings = ("text_column", "label_column", "validation_fraction", "test_fraction", "num_demo_examples")
    data = {
        **{name: lifecycle.file_identity(getattr(cls_args, name)) for name in files},
        **{k: getattr(cls_args, k) for k in (*settings, "demo_label_weights", "data_seed")},
        "labels": labels,
    }
    return lifecycle.fine_tuning_fingerprint(
        cls_args, tokenizer, loop_args, lora_args, max_length, data, balanced_sampling=cls_args.balanced_sampling
    )


def _summary(
    cls_args: ClassifyArguments,
    splits: ClassificationSplits,
    labels: list[str],
    model: torch.nn.Module,
    num_processes: int,
) -> str:
    trainable, total = trainable_parameter_counts(model)
    parts = (("train", splits.train), ("validation", splits.validation), ("test", splits.test))
    counts = ", ".join(f"{name}: {len(data.dataset)}" for name, data in parts if data)
    return (
        f"data: {splits.description}\n  labels: {labels}\n  records: {counts}\n"
        f"trainable parameters ({cls_args.finetune}): {trainable:,} of {total:,} ({trainable / total:.2%}); "
        f"processes: {num_processes}"
    )


def _report(
    before: dict[str, float] | None, validation: ClassificationReport, test: ClassificationReport | None
) -> str:
    lines = [f"\nbefore training: validation accuracy {before['val_accuracy']:.4f}"] if before else []
    for name, report in (("validation", validation), ("test", test)):
        if report is not None:
            scores = f"accuracy {report.accuracy:.4f} ({report.n_examples} texts), loss {report.loss:.4f}"
            lines.append(f"\n{name}: {scores}\n{report.format_confusion()}")
    return "\n".join(lines) + "\n"  # a blank line before "model saved to"


def _model_card(
    prepared: lifecycle.PreparedRun,
    cls_args: ClassifyArguments,
    splits: ClassificationSplits,
    validation: ClassificationReport,
) -> dict[str, Any]:
    method = {
        "last_block": "last block + final norm + head trained (the rest frozen)",
        "full": "full fine-tuning",
        "lora": "LoRA adapters + head, merged",
    }[cls_args.finetune]
    data = f"{splits.description}; labels {', '.join(validation.labels)}; {method}" + (
        "; class-balanced sampling" if cls_args.balanced_sampling else ""
    )
    evaluation = {
        "dataset_name": f"validation split of {splits.description} (accuracy {validation.accuracy:.3f})",
        "val_loss": validation.loss,
        "accuracy": validation.accuracy,
    }
    return {
        "training_info": lifecycle.training_info(prepared, data),
        "eval_results": evaluation,
        "base_model": cls_args.model_path,
        "pipeline_tag": "text-classification",
        "tags": ["text-classification"],
        "example_prompt": splits.validation.dataset[0]["text"],
    }
