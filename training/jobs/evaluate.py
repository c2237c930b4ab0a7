"""Evaluate a saved causal LM folder on a text source: the job behind `scripts/evaluate.py`.

Any folder written by `save_pretrained` works (MiniGPT, GPT-2, or another causal LM transformers
knows), loaded by `training.saved.load.load_model`: no code saved in the folder runs unless
--trust_remote_code is given. The tokenizer defaults to the same folder and must have exactly the
model's vocabulary (`tokenization.load.check_tokenizer`). The text comes from `tokenization.corpus` (a text file or
folder, or any dataset source), and every number is defined in `training.evaluation.metrics`. With several
processes each scores its share of the windows; the JSON file is written atomically by the main
process.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from itertools import groupby
from operator import itemgetter
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import GPT2LMHeadModel

from modeling_minigpt.convert import gpt2_to_minigpt
from modeling_minigpt.files import atomic_write_json
from modeling_minigpt.quantize import quantize_int8
from tokenization.load import check_tokenizer, load_tokenizer
from training.data.windows import load_corpus
from training.evaluation.metrics import MetricsReport, evaluate_texts
from training.saved.load import TRUST_HELP, check_model_folder, load_model
from training.saved.outputs import check_outputs, named_inputs


@dataclass
class EvaluateArguments:
    """The saved folder, the text to score and how to window it."""

    model: str | None = field(default=None, metadata={"help": "Saved model folder (save_pretrained output). Required."})
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer folder; None: the model folder."})
    text_file: str | None = field(
        default=None, metadata={"help": "A UTF-8 text file (or a folder of .txt files), each file one document."}
    )
    dataset: str | None = field(
        default=None,
        metadata={
            "help": "A dataset: a .json/.jsonl/.csv/.parquet file, a save_to_disk folder, a folder datasets can "
            "load, or a Hub name (needs network). Each row of --text_column is one document."
        },
    )
    text_column: str = field(default="text", metadata={"help": "Column holding the text."})
    split: str = field(
        default="train",
        metadata={"help": "Split of --dataset (a single data file has only train)."},
    )
    context_length: int | None = field(
        default=None, metadata={"help": "Window length in tokens; None: the model's maximum."}
    )
    stride: int | None = field(
        default=None,
        metadata={"help": "Tokens between window starts; None: context_length // 2; context_length: no overlap."},
    )
    batch_size: int = field(default=8, metadata={"help": "Windows per forward pass (lower it if memory is short)."})
    max_windows: int | None = field(default=None, metadata={"help": "Score only the first N windows; None: all."})
    bootstrap: int = field(default=1000, metadata={"help": "Bootstrap resamples for the confidence interval; 0: none."})
    confidence: float = field(default=0.95, metadata={"help": "Confidence level of the interval."})
    seed: int = field(default=0, metadata={"help": "Seed of the bootstrap."})
    output_json: str | None = field(
        default=None,
        metadata={"help": "Write the report here as JSON (atomically); an existing file only with --overwrite."},
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing --output_json file."})
    trust_remote_code: bool = field(default=False, metadata={"help": TRUST_HELP})
    int8: bool = field(
        default=False,
        metadata={
            "help": "Score the model with int8 linear layers (modeling_minigpt.quantize, CPU only): how much "
            "the fast int8 decoding path changes loss and perplexity."
        },
    )

    def __post_init__(self) -> None:
        for name in ("context_length", "stride", "max_windows"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1 (or left out for its default), got {getattr(self, name)}")
        if self.batch_size < 1:
            raise ValueError(f"--batch_size must be >= 1, got {self.batch_size}")
        if self.bootstrap < 0:
            raise ValueError(f"--bootstrap must be >= 0 (0: no confidence interval), got {self.bootstrap}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"--confidence must be between 0 and 1 (e.g. 0.95), got {self.confidence}")
        if self.output_json is not None and Path(self.output_json).is_dir():
            raise ValueError(f"--output_json {self.output_json} is a folder: give a file name, e.g. report.json")
        check_outputs({"--output_json": self.output_json}, named_inputs(self), self.overwrite)


def load_documents(args: EvaluateArguments) -> tuple[list[str], str]:
    """(documents, where they came from) for --text_file or --dataset, read by `load_corpus`.

    Streaming, so evaluating writes no cache. Long documents arrive in pieces that share a
    `doc_id`; they are joined back into whole documents here.
    """
    if (args.text_file is None) == (args.dataset is None):
        raise ValueError("give exactly one of --text_file and --dataset")
    if args.text_file is not None:
        source, flag, where = Path(args.text_file), "--text_file", args.text_file
    else:
        source, flag, where = (
            args.dataset,
            "--dataset",
            f"{args.dataset} (split {args.split!r}, column {args.text_column!r})",
        )
    rows = load_corpus(source, text_column=args.text_column, split=args.split, streaming=True, what=flag)
    documents = ["".join(row["text"] for row in doc) for _, doc in groupby(rows, key=itemgetter("doc_id"))]
    return documents, where


def int8_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`model` with int8 linear layers (a GPT-2 first converted to MiniGPT, whose projections are
    `nn.Linear`s rather than GPT-2's Conv1D); ValueError off the CPU."""
    if device.type != "cpu":
        raise ValueError(f"--int8 runs on the CPU only (fbgemm's int8 kernels); this process runs on {device}")
    if isinstance(model, GPT2LMHeadModel):
        model = gpt2_to_minigpt(model)
    return quantize_int8(model)


def evaluate_folder(args: EvaluateArguments) -> MetricsReport:
    """Score the folder on the text, print the report and write it as JSON if asked."""
    if args.model is None:
        raise ValueError("--model is required (a folder written by save_pretrained)")
    model_dir = check_model_folder(args.model, "--model")
    tokenizer_dir = Path(args.tokenizer or args.model)
    accelerator = Accelerator()
    if accelerator.is_main_process:
        print(f"evaluate.py on {accelerator.num_processes} process(es), config:", asdict(args))
    documents, source = load_documents(args)
    tokenizer = load_tokenizer(tokenizer_dir, trust_remote_code=args.trust_remote_code)
    model = load_model(model_dir, "causal-lm", trust_remote_code=args.trust_remote_code, what="--model")
    check_tokenizer(tokenizer, model.config.vocab_size)
    model.to(accelerator.device)
    if args.int8:
        model = int8_model(model, accelerator.device)
    report = evaluate_texts(
        model,
        tokenizer,
        documents,
        context_length=args.context_length,
        stride=args.stride,
        batch_size=args.batch_size,
        max_windows=args.max_windows,
        n_bootstrap=args.bootstrap,
        seed=args.seed,
        alpha=1 - args.confidence,
        accelerator=accelerator,
        show_progress=True,
    )
    if accelerator.is_main_process:
        print(f"\nmodel {model_dir}  tokenizer {tokenizer_dir}\ndata  {source}\n{report.to_text()}")
        if args.output_json:
            record = {"model": str(model_dir), "tokenizer": str(tokenizer_dir), "data": source, **report.to_dict()}
            print(f"wrote {atomic_write_json(args.output_json, record)}")
    return report
