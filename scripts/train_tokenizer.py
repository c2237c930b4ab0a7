"""Train a byte-level BPE tokenizer and save it for AutoTokenizer.from_pretrained.

    python scripts/train_tokenizer.py --files ../shared/data/tinyshakespeare.txt --vocab_size 4096 --output_dir runs/tok
    python scripts/train_tokenizer.py --dataset data/wiki_saved --text_column text --vocab_size 16384 \\
        --output_dir runs/tok
    python scripts/train_tokenizer.py config.yaml --vocab_size 8192     # flags override the file

Writes to output_dir: tokenizer.json, tokenizer_config.json, chat_template.jinja (the Alpaca
format), merges_table.md (the first merges with their corpus frequency; this reads the corpus a
second time in plain Python, so set --merges_table 0 for very large corpora) and
token_boundaries.html (the start of the corpus, coloured by token).
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from tokenization import EMBEDDED_CORPUS, SPECIAL_TOKENS, train_bpe
from tokenization.corpus import OpenedSource, open_source
from tokenization.visualize import write_views
from training.cli import USER_ERRORS, parse_config_args, report_error
from training.saved.outputs import check_outputs, named_inputs


@dataclass
class TokenizerArguments:
    output_dir: str = field(
        metadata={
            "help": "Folder to save the tokenizer in: new or empty, or any folder with --overwrite (other files kept)."
        }
    )
    files: list[str] = field(
        default_factory=list,
        metadata={
            "help": "UTF-8 text files to train on. With neither --files nor --dataset: the embedded corpus "
            "(CPython's own documentation, pydoc_data.topics, ~465k characters)."
        },
    )
    dataset: str | None = field(
        default=None,
        metadata={
            "help": "Instead of --files: a .json/.jsonl/.csv/.parquet/.arrow file, a folder written by "
            "Dataset.save_to_disk (its 'train' split), a folder of .txt or data files, or a dataset name."
        },
    )
    text_column: str = field(default="text", metadata={"help": "Column holding the text when --dataset holds rows."})
    vocab_size: int = field(default=8192, metadata={"help": "Total vocabulary: 256 bytes + special tokens + merges."})
    min_frequency: int = field(default=2, metadata={"help": "Never merge a pair seen fewer times than this."})
    special_tokens: list[str] = field(
        default_factory=lambda: list(SPECIAL_TOKENS),
        metadata={"help": "All special tokens; must include <|endoftext|> (eos/bos) and <|pad|>."},
    )
    model_max_length: int | None = field(default=1024, metadata={"help": "Context length recorded in the tokenizer."})
    trace_word: str = field(
        default=" tokenization", metadata={"help": "Word whose BPE merge trace is drawn to merge_trace.png."}
    )
    merges_table: int = field(
        default=50, metadata={"help": "Rows of merges_table.md (0: skip; replays the corpus in Python)."}
    )
    no_progress: bool = field(default=False, metadata={"help": "Hide the trainer's progress bars."})
    overwrite: bool = field(
        default=False, metadata={"help": "Write into a folder that is not empty, replacing its tokenizer files."}
    )


def parse_args(argv: list[str] | None = None) -> TokenizerArguments:
    """CLI flags, optionally after a leading YAML/JSON config file whose values become defaults."""
    (args,) = parse_config_args((TokenizerArguments,), argv, __doc__.split("\n\n")[0])
    if args.files and args.dataset:
        raise ValueError("give --files or --dataset, not both")
    check_outputs({"--output_dir": args.output_dir}, named_inputs(args), args.overwrite)
    return args


def load_source(args: TokenizerArguments) -> OpenedSource:
    """The texts of --files, else of --dataset, else the embedded corpus."""
    if args.files:
        return open_source([Path(f) for f in args.files], what="--files")
    return open_source(args.dataset or EMBEDDED_CORPUS, what="--dataset")


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        print("config:", yaml.safe_dump(asdict(args), sort_keys=False).strip().replace("\n", "\n  "))
        source = load_source(args)
        start = time.perf_counter()
        tokenizer = train_bpe(
            source,
            args.vocab_size,
            min_frequency=args.min_frequency,
            special_tokens=args.special_tokens,
            output_dir=args.output_dir,
            model_max_length=args.model_max_length,
            show_progress=not args.no_progress,
            text_column=args.text_column,
        )
        seconds = time.perf_counter() - start
        table = write_views(
            tokenizer,
            source,
            args.output_dir,
            trace_word=args.trace_word,
            merges_table_rows=args.merges_table,
            text_column=args.text_column,
        )
    except USER_ERRORS as error:
        return report_error(error)
    if table is not None:
        print(table)
    print(f"trained {len(tokenizer)} tokens in {seconds:.1f} s; saved to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
