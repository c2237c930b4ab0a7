"""Pretraining a MiniGPT from a text corpus: the job behind `scripts/pretrain.py`.

`run_pretraining(model_args, data_args, loop_args)` checks every input, reads and identifies the
text (`training.data.windows.read_pretraining_text`: each file read once), builds the tokenizer,
the windows (`pretraining_windows`, saved once for later runs) and the model, and goes through the
run lifecycle of `training.run.lifecycle`: train, evaluate the result on the whole validation set,
and save a Hugging Face folder (`output_dir/model`: weights, code for trust_remote_code, tokenizer,
model card with the loss curve).

Order matters for "nothing half-written": everything that can reject the inputs (missing files,
a tokenizer that does not fit the model, a corpus shorter than a window, an output folder that
holds another run) runs before the first byte is written to the output folder.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import gather_object, set_seed
from datasets import Dataset, IterableDataset
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from modeling_minigpt import MiniGPTConfig, MiniGPTForCausalLM
from tokenization import EMBEDDED_CORPUS, train_bpe
from tokenization.load import check_tokenizer, load_tokenizer, tokenizer_fingerprint
from tokenization.train import save_atomically
from training.data.collate import collate_windows
from training.data.windows import (
    PretrainingData,
    PretrainingText,
    check_pipeline_tokenizer,
    pretraining_windows,
    read_pretraining_text,
)
from training.evaluation.generate import greedy_generate
from training.evaluation.metrics import MetricsReport, evaluate_loss, evaluate_texts, token_byte_table
from training.run import lifecycle, zero
from training.run.arguments import LoopArguments
from training.run.distributed import RankBatches, is_sharded
from training.run.loop import make_train_dataloader
from training.saved.card import EvalInfo
from training.saved.layout import RunLayout

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
    fsdp: bool = field(
        default=False,
        metadata={
            "help": "Shard the model over the processes with FSDP2 (one group per transformer block plus the root, "
            "training.run.distributed.shard_model) instead of replicating it (DDP); launched like DDP. Verified on CPU "
            "(gloo), not on GPUs. Checkpoints and the final model hold the whole, unsharded state."
        },
    )

    def __post_init__(self) -> None:
        # The in-training sample continues a one-token prompt by at least one token.
        if self.context_length is not None and self.context_length < 2:
            raise ValueError(
                f"--context_length must be >= 2 (the sample continues a 1-token prompt), got {self.context_length}"
            )


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
    windows_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where the tokenized windows are saved once (Arrow, one folder per training and validation "
            "content, tokenizer, context length and stride) and loaded by later runs and every process. "
            "Default: <cache_dir>/windows, or under datasets' cache."
        },
    )
    num_proc: int | None = field(
        default=None,
        metadata={
            "help": "Processes that tokenize the corpus (not with --streaming). Default: one per CPU, at most 8, "
            "each with at least 1 MB of text (a smaller corpus is tokenized in-process, on every core)."
        },
    )
    streaming: bool = field(
        default=False,
        metadata={
            "help": "Tokenize the training text while training instead of ahead of it (nothing is cached), each "
            "process keeping its own share of the windows (datasets' split_dataset_by_node) and all processes "
            "taking the same number of batches per epoch. Needs --split_by documents or a --validation_file."
        },
    )
    shuffle_buffer: int = field(
        default=4096,
        metadata={"help": "With --streaming: windows in the shuffle buffer (seeded by seed + epoch); 1: stream order."},
    )

    def __post_init__(self) -> None:
        if not 0 <= self.validation_fraction < 1:
            raise ValueError(f"--validation_fraction must be in [0, 1), got {self.validation_fraction}")
        if self.streaming and self.split_by != "documents" and self.validation_file is None:
            raise ValueError(
                f"--streaming cannot hold out the last {self.split_by} of a stream whose length is unknown: "
                "pass --split_by documents or a --validation_file"
            )
        if self.num_proc is not None and self.num_proc < 1:
            raise ValueError(f"--num_proc must be >= 1, got {self.num_proc}")
        for name in ("eval_batch_size", "eval_batches", "sample_tokens", "shuffle_buffer"):
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


def run_pretraining(model_args: ModelArguments, data_args: DataArguments, loop_args: LoopArguments) -> PretrainResult:
    """Pretrain, evaluate and save; resumes when `loop_args.resume` (see module docstring)."""
    run = lifecycle.open_run("pretrain", "Pretraining", loop_args, data_args)
    if not data_args.train_file:
        raise ValueError("--train_file is required: the text to pretrain on")
    text = read_pretraining_text(
        data_args.train_file,
        validation_file=data_args.validation_file,
        validation_fraction=data_args.validation_fraction,
        split_by=data_args.split_by,
        streaming=data_args.streaming,
    )
    tokenizer = _tokenizer(run.accelerator, data_args, text, run.layout, loop_args.resume)
    model_config = build_model_config(model_args, tokenizer)
    with run.accelerator.main_process_first():  # rank 0 fills the datasets cache, the others read it
        data = _windows(text, tokenizer, data_args, model_config.context_length)
    set_seed(loop_args.seed)  # the same initial weights on every process and in every rerun
    config = {"model": model_config.to_diff_dict(), "model_args": asdict(model_args), "data": asdict(data_args)}
    prepared = lifecycle.prepare(
        run,
        MiniGPTForCausalLM(model_config),
        _train_batches(run, data_args, data.train, loop_args.per_device_batch_size),
        DataLoader(data.validation, batch_size=data_args.eval_batch_size, collate_fn=collate_windows),
        fingerprint=_fingerprint(model_args, data_args, loop_args, model_config, text),
        config={**config, "loop": asdict(loop_args)},
        summary=f"processes: {run.accelerator.num_processes}{' (model sharded, FSDP2)' if model_args.fsdp else ''}; "
        f"training: {_describe_windows(data.train)}; validation: {_describe_windows(data.validation)}; {data.origin}",
        shard=model_args.fsdp,
    )
    if run.is_main and data_args.tokenizer_path is None:
        save_atomically(tokenizer, run.layout.tokenizer)
    lifecycle.train(prepared, partial(periodic_evaluation, prepared, tokenizer, data_args))
    position = data_position(prepared)
    report = final_evaluation(prepared, tokenizer, data.validation_text, model_config.context_length)
    result = _result(prepared, report, training_chars_per_token(data.train, tokenizer))
    lifecycle.finish(
        prepared,
        tokenizer,
        card=_model_card(prepared, model_args, data, report, model_config.context_length),
        json_files={run.layout.final_metrics: _result_summary(result)},
        report=f"\nfinal validation ({data.validation_description}):\n{report.to_text()}\n"
        f"{result.steps} steps, {result.tokens_seen:,} tokens in {result.train_seconds:.1f} s (evaluations included): "
        f"{result.tokens_per_second:,.0f} tokens/s, {result.chars_per_second:,.0f} characters/s\n{position}",
    )
    return result


# ----------------------------------------------------------------------------- inputs


def _tokenizer(
    accelerator: Accelerator, data_args: DataArguments, text: PretrainingText, layout: RunLayout, resume: bool
) -> PreTrainedTokenizerBase:
    """The given tokenizer; on resume, the one this run trained; otherwise a BPE trained in memory
    on the training text (never the held-out characters).

    Training happens on every process (it is deterministic; checked below) so nothing needs to
    be written before the output folder has been checked.
    """
    if data_args.tokenizer_path is not None:
        return load_tokenizer(data_args.tokenizer_path)
    if resume and (layout.tokenizer / "tokenizer.json").is_file():
        return load_tokenizer(layout.tokenizer)
    if PartialState().is_main_process:  # a long step: say what it is (pass --tokenizer_path to skip it)
        print(f"training a {data_args.tokenizer_vocab_size:,}-token BPE tokenizer on {text.name}")
    tokenizer = train_bpe(text.train, data_args.tokenizer_vocab_size, show_progress=False)
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
    model_args: ModelArguments,
    data_args: DataArguments,
    loop_args: LoopArguments,
    model_config: MiniGPTConfig,
    text: PretrainingText,
) -> dict[str, Any]:
    """What must be equal for a resumed run to continue the same run (see `training.run.lifecycle.check_run_folder`).

    Logging, evaluation and checkpoint cadence may change between segments; the model's shape,
    the tokenizer, the data (what its files hold: `text`'s identities, found once) and the
    optimisation may not.
    """
    if data_args.tokenizer_path:
        path = data_args.tokenizer_path
        tokenizer = {"path": str(Path(path).resolve()), "hash": tokenizer_fingerprint(load_tokenizer(path))}
    else:
        tokenizer = {"trained_vocab_size": data_args.tokenizer_vocab_size}
    validation = text.validation_identity.record if text.validation_identity else None
    files = {"train_file": text.identity.record, "validation_file": validation}
    data = {k: getattr(data_args, k) for k in ("validation_fraction", "split_by", "stride", "streaming")}
    if data_args.streaming:  # the stream's order depends on it
        data["shuffle_buffer"] = data_args.shuffle_buffer
    model = {name: getattr(model_config, name) for name in ("vocab_size", *_SHAPE_FIELDS)}
    sharding = {"sharding": "fsdp"} if model_args.fsdp else {}  # its checkpoints hold the state in another form
    return lifecycle.run_fingerprint(loop_args, model=model, tokenizer=tokenizer, data={**files, **data}, **sharding)


def _windows(
    text: PretrainingText, tokenizer: PreTrainedTokenizerBase, data_args: DataArguments, context_length: int
) -> PretrainingData:
    """`training.data.windows.pretraining_windows` with the run's flags."""
    return pretraining_windows(
        text,
        tokenizer,
        context_length=context_length,
        stride=data_args.stride,
        streaming=data_args.streaming,
        num_proc=data_args.num_proc,
        cache_dir=data_args.cache_dir,
        windows_dir=data_args.windows_dir,
    )


def _train_batches(
    run: lifecycle.Run, data_args: DataArguments, windows: Dataset | IterableDataset, batch_size: int
) -> DataLoader | RankBatches:
    """A shuffled loader of the windows (`accelerator.prepare` gives each process its share), or,
    for a stream, this process's share of it."""
    seed = run.args.seed
    if isinstance(windows, Dataset):
        return make_train_dataloader(windows, batch_size, collate_windows, seed)
    accelerator = run.accelerator
    return RankBatches(
        windows,
        batch_size,
        collate_windows,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        seed=seed,
        shuffle_buffer=data_args.shuffle_buffer,
        device=accelerator.device,
    )


def _describe_windows(windows: Dataset | IterableDataset) -> str:
    return f"{len(windows):,} windows" if isinstance(windows, Dataset) else "windows streamed"


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
    # A sharded forward (FSDP2, DeepSpeed ZeRO-3) needs every rank (same greedy ids).
    if accelerator.is_main_process or is_sharded(model) or zero.is_deepspeed(accelerator):
        unwrapped = accelerator.unwrap_model(model)
        sample = generate_sample(unwrapped, tokenizer, data_args.sample_prompt, data_args.sample_tokens)
        if accelerator.is_main_process:
            values["sample"] = sample
    return values


def data_position(prepared: lifecycle.PreparedRun) -> str:
    """Where every process stopped in the data, checked to be the same place (RuntimeError otherwise).

    Only the main process's position is saved in a checkpoint, so a process elsewhere in its
    share (a stream whose shares were not cut to the same number of batches) would resume wrong.
    """
    state = prepared.state
    positions = gather_object([(state.step, state.epoch, state.batches_in_epoch)])
    if len(set(positions)) > 1:
        raise RuntimeError(f"the processes stopped at different data positions (step, epoch, batch): {positions}")
    return (
        f"all {len(positions)} process(es) stopped at step {state.step}, "
        f"epoch {state.epoch} + {state.batches_in_epoch} batches"
    )


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
    first = [window["input_ids"] for window in islice(windows, max_windows)]
    ids = torch.as_tensor(first)[:, :-1]  # (W, T)
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
    # How the text was scored changes the numbers (scripts/evaluate.py's default stride gives each
    # token more context than these non-overlapping windows): the card says which.
    if report.context_length is not None and report.stride is not None:
        dataset_name += f", windows of {report.context_length} tokens, stride {report.stride}"
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
    prepared: lifecycle.PreparedRun,
    model_args: ModelArguments,
    data: PretrainingData,
    report: MetricsReport,
    context_length: int,
) -> dict[str, Any]:
    data_in_words = f"{data.train_description} ({_describe_windows(data.train)})"
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
