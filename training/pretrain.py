"""Pretraining a MiniGPT from a text corpus: the job behind `scripts/pretrain.py`.

`run_pretraining(model_args, data_args, loop_args)` checks every input, builds the tokenizer,
the windowed datasets and the model, and goes through the run lifecycle of `training.run`:
train, evaluate the result on the whole validation set, and save a Hugging Face folder
(`output_dir/model`: weights, code for trust_remote_code, tokenizer, model card with the loss
curve).

Order matters for "nothing half-written": everything that can reject the inputs (missing files,
a tokenizer that does not fit the model, a corpus shorter than a window, an output folder that
holds another run) runs before the first byte is written to the output folder.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import gather_object, set_seed
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

import training.run as lifecycle
from modeling_minigpt import MiniGPTConfig, MiniGPTForCausalLM
from tokenization import EMBEDDED_CORPUS, train_bpe
from tokenization.corpus import DataError, open_source, read_text
from tokenization.load import check_tokenizer, load_tokenizer, tokenizer_fingerprint
from tokenization.train import save_atomically
from training.collate import collate_windows
from training.data import build_lm_datasets, check_pipeline_tokenizer
from training.evaluate import MetricsReport, evaluate_loss, evaluate_texts, token_byte_table
from training.generate import greedy_generate
from training.layout import RunLayout
from training.loop import LoopArguments, make_train_dataloader
from training.model_card import EvalInfo

# Model fields a run may set; anything not given comes from the preset.
_SHAPE_FIELDS = ("context_length", "emb_dim", "n_heads", "n_layers", "drop_rate")


@dataclass
class ModelArguments:
    """The model's shape: a preset plus any overridden field."""

    preset: str = field(
        default="tiny", metadata={"help": "MiniGPTConfig preset to start from (tiny, gpt2-small, ...)."}
    )
    vocab_size: int | None = field(
        default=None,
        metadata={"help": "Vocabulary size; default: the tokenizer's. If given, it must equal the tokenizer's."},
    )
    context_length: int | None = field(
        default=None, metadata={"help": "Tokens the model reads at once (T). Default: the preset's."}
    )
    emb_dim: int | None = field(default=None, metadata={"help": "Width of the residual stream. Default: the preset's."})
    n_heads: int | None = field(
        default=None, metadata={"help": "Attention heads (must divide emb_dim). Default: the preset's."}
    )
    n_layers: int | None = field(default=None, metadata={"help": "Transformer blocks. Default: the preset's."})
    drop_rate: float | None = field(default=None, metadata={"help": "Dropout probability. Default: the preset's."})


@dataclass
class DataArguments:
    """The corpus, its split, the tokenizer, evaluation and sampling."""

    train_file: str = field(
        default=EMBEDDED_CORPUS,
        metadata={
            "help": "Training text: a UTF-8 file, a folder of .txt files, a .jsonl/.csv/.parquet file or save_to_disk "
            "folder with a 'text' column, or a dataset name. "
            f"Default {EMBEDDED_CORPUS!r}: CPython's own documentation (pydoc_data.topics, ~465k characters)."
        },
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "Held-out text file. Default: hold out part of train_file."}
    )
    validation_fraction: float = field(
        default=0.1, metadata={"help": "Share of train_file held out (at its end) when there is no validation_file."}
    )
    split_by: Literal["characters", "tokens", "documents"] = field(
        default="tokens",
        metadata={
            "help": "How validation_fraction is cut: the last characters of a single text file (read into memory), "
            "the last tokens of the stream, or every n-th document."
        },
    )
    tokenizer_path: str | None = field(
        default=None,
        metadata={"help": "Folder of a saved tokenizer. Default: train a byte-level BPE on the training text."},
    )
    tokenizer_vocab_size: int = field(
        default=1024, metadata={"help": "Vocabulary size of the BPE trained when no tokenizer_path is given."}
    )
    stride: int | None = field(
        default=None, metadata={"help": "Tokens between training window starts. Default: context_length (no overlap)."}
    )
    eval_batch_size: int = field(default=16, metadata={"help": "Windows per evaluation batch, per process."})
    eval_batches: int = field(
        default=20, metadata={"help": "Batches per process for the periodic evaluation (the final one uses all)."}
    )
    sample_prompt: str = field(
        default="", metadata={"help": "Prompt of the sample generated at each evaluation; empty: start of a document."}
    )
    sample_tokens: int = field(default=48, metadata={"help": "Tokens generated (greedily) for the sample."})
    cache_dir: str | None = field(
        default=None, metadata={"help": "Where `datasets` caches the tokenized windows. Default: its own cache."}
    )

    def __post_init__(self) -> None:
        if not 0 <= self.validation_fraction < 1:
            raise ValueError(f"--validation_fraction must be in [0, 1), got {self.validation_fraction}")
        for name in ("eval_batch_size", "eval_batches", "sample_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class PretrainResult:
    """What a finished run returns (the same numbers are in output_dir/final_metrics.json)."""

    output_dir: Path
    model_dir: Path
    steps: int
    tokens_seen: int
    train_seconds: float  # time in the training loop, evaluations and checkpoints included
    tokens_per_second: float  # tokens_seen / train_seconds
    chars_per_second: float  # tokens_per_second x characters per token of the training windows
    report: MetricsReport  # final evaluation on the whole validation set


@dataclass
class _Data:
    """The windowed splits, and how to describe them."""

    train: Any  # datasets.Dataset of windows
    validation: Any
    validation_text: str | None  # the whole held-out text, when it is known as text
    train_description: str
    validation_description: str


def run_pretraining(model_args: ModelArguments, data_args: DataArguments, loop_args: LoopArguments) -> PretrainResult:
    """Pretrain, evaluate and save; resumes when `loop_args.resume` (see module docstring)."""
    run = lifecycle.open_run("pretrain", "Pretraining", loop_args)
    if not data_args.train_file:
        raise ValueError("--train_file is required: the text to pretrain on")
    tokenizer = _tokenizer(run.accelerator, data_args, run.layout, loop_args.resume)
    model_config = build_model_config(model_args, tokenizer)
    with run.accelerator.main_process_first():  # rank 0 fills the datasets cache, the others read it
        data = _build_data(data_args, tokenizer, model_config.context_length)
    set_seed(loop_args.seed)  # the same initial weights on every process and in every rerun
    config = {"model": model_config.to_diff_dict(), "model_args": asdict(model_args), "data": asdict(data_args)}
    prepared = lifecycle.prepare(
        run,
        MiniGPTForCausalLM(model_config),
        make_train_dataloader(data.train, loop_args.per_device_batch_size, collate_windows, loop_args.seed),
        DataLoader(data.validation, batch_size=data_args.eval_batch_size, collate_fn=collate_windows),
        fingerprint=_fingerprint(model_args, data_args, loop_args, model_config),
        config={**config, "loop": asdict(loop_args)},
        summary=f"processes: {run.accelerator.num_processes}; training windows: {len(data.train):,}; "
        f"validation windows: {len(data.validation):,}",
    )
    if run.is_main and data_args.tokenizer_path is None:
        save_atomically(tokenizer, run.layout.tokenizer)
    lifecycle.train(prepared, partial(periodic_evaluation, prepared, tokenizer, data_args))
    report = final_evaluation(prepared, tokenizer, data.validation_text, model_config.context_length)
    result = _result(prepared, report, training_chars_per_token(data.train, tokenizer))
    lifecycle.finish(
        prepared,
        tokenizer,
        card=_model_card(prepared, model_args, data, report, model_config.context_length),
        json_files={run.layout.final_metrics: _result_summary(result)},
        report=f"\nfinal validation ({data.validation_description}):\n{report.to_text()}\n"
        f"{result.steps} steps, {result.tokens_seen:,} tokens in {result.train_seconds:.1f} s (evaluations included): "
        f"{result.tokens_per_second:,.0f} tokens/s, {result.chars_per_second:,.0f} characters/s",
    )
    return result


# ----------------------------------------------------------------------------- inputs


def _tokenizer(
    accelerator: Accelerator, data_args: DataArguments, layout: RunLayout, resume: bool
) -> PreTrainedTokenizerBase:
    """The given tokenizer; on resume, the one this run trained; otherwise a BPE trained in memory.

    Training happens on every process (it is deterministic; checked below) so nothing needs to
    be written before the output folder has been checked.
    """
    if data_args.tokenizer_path is not None:
        return load_tokenizer(data_args.tokenizer_path)
    if resume and (layout.tokenizer / "tokenizer.json").is_file():
        return load_tokenizer(layout.tokenizer)
    if data_args.split_by == "characters" and not data_args.validation_file:
        source = [_character_split(data_args)[0]]  # never the held-out text
    else:
        source = open_source(data_args.train_file, what="--train_file")
    if PartialState().is_main_process:  # a long step: say what it is (pass --tokenizer_path to skip it)
        print(
            f"training a {data_args.tokenizer_vocab_size:,}-token BPE tokenizer on {_source_name(data_args.train_file)}"
        )
    tokenizer = train_bpe(source, data_args.tokenizer_vocab_size, show_progress=False)
    if len(set(gather_object([tokenizer_fingerprint(tokenizer)]))) > 1:
        raise RuntimeError("the processes trained different tokenizers from the same text: pass --tokenizer_path")
    return tokenizer


def build_model_config(model_args: ModelArguments, tokenizer: PreTrainedTokenizerBase) -> MiniGPTConfig:
    """The preset with the given fields; vocab_size must match the tokenizer (DataError otherwise)."""
    check_pipeline_tokenizer(tokenizer)
    if model_args.vocab_size is not None:
        check_tokenizer(tokenizer, model_args.vocab_size)
    overrides = {name: getattr(model_args, name) for name in _SHAPE_FIELDS if getattr(model_args, name) is not None}
    return MiniGPTConfig.from_preset(
        model_args.preset,
        **overrides,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _fingerprint(
    model_args: ModelArguments, data_args: DataArguments, loop_args: LoopArguments, model_config: MiniGPTConfig
) -> dict[str, Any]:
    """What must be equal for a resumed run to continue the same run (see `training.run.check_run_folder`).

    Logging, evaluation and checkpoint cadence may change between segments; the model's shape,
    the tokenizer, the data and the optimisation may not.
    """
    if data_args.tokenizer_path:
        path = data_args.tokenizer_path
        tokenizer = {"path": str(Path(path).resolve()), "hash": tokenizer_fingerprint(load_tokenizer(path))}
    else:
        tokenizer = {"trained_vocab_size": data_args.tokenizer_vocab_size}
    files = {name: lifecycle.file_identity(getattr(data_args, name)) for name in ("train_file", "validation_file")}
    data = {k: getattr(data_args, k) for k in ("validation_fraction", "split_by", "stride")}
    model = {name: getattr(model_config, name) for name in ("vocab_size", *_SHAPE_FIELDS)}
    return lifecycle.run_fingerprint(loop_args, model=model, tokenizer=tokenizer, data={**files, **data})


def _character_split(data_args: DataArguments) -> tuple[str, str]:
    """(training, validation) text of train_file, cut `validation_fraction` of the characters from its end."""
    text = read_text(data_args.train_file, what="--train_file")
    cut = len(text) - round(data_args.validation_fraction * len(text))
    return text[:cut], text[cut:]


def _source_name(source: str) -> str:
    return "CPython's documentation (pydoc_data.topics)" if source == EMBEDDED_CORPUS else Path(source).name


def _build_data(data_args: DataArguments, tokenizer: PreTrainedTokenizerBase, context_length: int) -> _Data:
    """Training and validation windows (and the validation text when it is a text)."""
    common = dict(context_length=context_length, cache_dir=data_args.cache_dir)
    train_file = open_source(data_args.train_file, what="--train_file")
    name = _source_name(data_args.train_file)
    if data_args.validation_file is not None:
        validation_text = read_text(data_args.validation_file, what="--validation_file")
        train = build_lm_datasets(train_file, tokenizer, stride=data_args.stride, validation_fraction=0, **common)[
            "train"
        ]
        validation = build_lm_datasets([validation_text], tokenizer, validation_fraction=0, **common)["train"]
        return _Data(train, validation, validation_text, name, Path(data_args.validation_file).name)
    if not 0 < data_args.validation_fraction < 1:
        raise DataError(
            f"--validation_fraction must be in (0, 1) without a --validation_file, got {data_args.validation_fraction}"
        )
    if data_args.split_by == "characters":
        train_text, validation_text = _character_split(data_args)
        parts = {}
        for split, text, stride in (("training", train_text, data_args.stride), ("validation", validation_text, None)):
            try:
                parts[split] = build_lm_datasets([text], tokenizer, stride=stride, validation_fraction=0, **common)
            except DataError as error:
                raise DataError(
                    f"--train_file {data_args.train_file}, its {split} part (--split_by characters, "
                    f"--validation_fraction {data_args.validation_fraction}: {len(text):,} characters): {error}"
                ) from None
        train, validation = parts["training"]["train"], parts["validation"]["train"]
        return _Data(train, validation, validation_text, *_split_descriptions(data_args, name))
    splits = build_lm_datasets(
        train_file,
        tokenizer,
        stride=data_args.stride,
        validation_fraction=data_args.validation_fraction,
        split_by=data_args.split_by,
        **common,
    )
    return _Data(splits["train"], splits["validation"], None, *_split_descriptions(data_args, name))


def _split_descriptions(data_args: DataArguments, name: str) -> tuple[str, str]:
    """(training data, validation data) in words, for the printout and the model card."""
    held_out, unit = data_args.validation_fraction, data_args.split_by
    if unit == "documents":
        return (
            f"{name} without the held-out {held_out:.0%} of its documents",
            f"{held_out:.0%} of the documents of {name} (held out)",
        )
    return f"first {1 - held_out:.0%} of the {unit} of {name}", f"last {held_out:.0%} of the {unit} of {name}"


# ----------------------------------------------------------------------------- evaluation and output


def periodic_evaluation(
    prepared: lifecycle.PreparedRun,
    tokenizer: PreTrainedTokenizerBase,
    data_args: DataArguments,
    model: torch.nn.Module,
) -> dict[str, float | str]:
    """The loop's evaluation: loss and perplexity on the first `eval_batches` validation batches, and a sample."""
    accelerator = prepared.run.accelerator
    result = evaluate_loss(model, prepared.eval_loader, accelerator, max_batches=data_args.eval_batches)
    values: dict[str, float | str] = {"val_loss": result.loss, "val_perplexity": result.perplexity}
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        values["sample"] = generate_sample(unwrapped, tokenizer, data_args.sample_prompt, data_args.sample_tokens)
    return values


def generate_sample(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompt: str, max_new_tokens: int
) -> str:
    """Greedy continuation of `prompt` (of a document start when empty), special tokens shown."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else [tokenizer.eos_token_id]
    max_new_tokens = min(max_new_tokens, model.config.max_position_embeddings - 1)
    [new] = greedy_generate(
        model, [ids], max_new_tokens, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    return prompt + tokenizer.decode(new, skip_special_tokens=False)


def training_chars_per_token(windows: Any, tokenizer: PreTrainedTokenizerBase, max_windows: int = 4096) -> float:
    """Characters per token of the training windows (the first `max_windows`), to turn tokens/s into characters/s.

    Exact for a byte-level BPE: each id stands for a fixed byte string (`token_byte_table`).
    """
    ids = torch.as_tensor(windows.select(range(min(max_windows, len(windows))))["input_ids"])[:, :-1]  # (W, T)
    return token_byte_table(tokenizer).n_chars[ids].sum().item() / ids.numel()


def final_evaluation(
    prepared: lifecycle.PreparedRun,
    tokenizer: PreTrainedTokenizerBase,
    validation_text: str | None,
    context_length: int,
) -> MetricsReport:
    """Loss, perplexity, bits per byte and per character over the whole validation set, with CIs.

    A known validation text is scored whole: non-overlapping windows (stride = context length,
    the last one moved to end at the text's end), every character exactly once, each token with
    on average half a window of context, as during training. Otherwise all validation windows.
    """
    model, accelerator = prepared.model, prepared.run.accelerator
    if validation_text is not None:
        window = dict(context_length=context_length, stride=context_length)
        return evaluate_texts(model, tokenizer, [validation_text], **window, accelerator=accelerator)
    result = evaluate_loss(model, prepared.eval_loader, accelerator, byte_table=token_byte_table(tokenizer))
    return MetricsReport.from_result(result, context_length=context_length, stride=context_length)


def eval_info(dataset_name: str, report: MetricsReport) -> EvalInfo:
    """What the model card says about the final evaluation."""
    evaluation: EvalInfo = {
        "dataset_name": dataset_name,
        "val_loss": report.loss,
        "perplexity": report.perplexity,
        "num_tokens": report.n_tokens,
    }
    if report.loss_ci:
        evaluation.update(
            val_loss_ci=tuple(report.loss_ci),
            perplexity_ci=tuple(report.perplexity_ci),
            confidence_level=report.confidence,
        )
    if report.bits_per_byte is not None:
        evaluation["bits_per_byte"] = report.bits_per_byte
    if report.bits_per_byte_ci:
        evaluation["bits_per_byte_ci"] = tuple(report.bits_per_byte_ci)
    return evaluation


def _model_card(
    prepared: lifecycle.PreparedRun, model_args: ModelArguments, data: _Data, report: MetricsReport, context_length: int
) -> dict[str, Any]:
    data_in_words = f"{data.train_description} ({len(data.train):,} windows)"
    training = lifecycle.training_info(prepared, data_in_words, tokens_per_sequence=context_length)
    return {
        "training_info": {"preset": model_args.preset, **training},
        "eval_results": eval_info(data.validation_description, report),
    }


def _result(prepared: lifecycle.PreparedRun, report: MetricsReport, chars_per_token: float) -> PretrainResult:
    state, layout = prepared.state, prepared.run.layout
    tokens_per_second = state.tokens_seen / max(state.train_seconds, 1e-9)
    return PretrainResult(
        output_dir=layout.root,
        model_dir=layout.model,
        steps=state.step,
        tokens_seen=state.tokens_seen,
        train_seconds=state.train_seconds,
        tokens_per_second=tokens_per_second,
        chars_per_second=tokens_per_second * chars_per_token,
        report=report,
    )


def _result_summary(result: PretrainResult) -> dict[str, Any]:
    return {
        "steps": result.steps,
        "tokens_seen": result.tokens_seen,
        "train_seconds": result.train_seconds,
        "tokens_per_second": result.tokens_per_second,
        "chars_per_second": result.chars_per_second,
        "validation": result.report.to_dict(),
    }
