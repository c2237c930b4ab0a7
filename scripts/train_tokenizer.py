"""Train a byte-level BPE tokenizer and save it for AutoTokenizer.from_pretrained.

    python scripts/train_tokenizer.py --files ../shared/data/tinyshakespeare.txt --vocab_size 4096 --output_dir runs/tok
    python scripts/train_tokenizer.py --dataset data/wiki_saved --text_column text --vocab_size 16384 --output_dir runs/tok
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

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(REPO_ROOT))

from tokenization import (  # noqa: E402
    EMBEDDED_CORPUS,
    SPECIAL_TOKENS,
    format_merge_table,
    merge_table,
    merge_trace,
    merge_trace_figure,
    token_boundaries_html,
    train_bpe,
)
from tokenization.corpus import iter_texts  # noqa: E402
from modeling_minigpt.files import atomic_write_text, save_figure  # noqa: E402
from training.cli import parse_config_args  # noqa: E402


@dataclass
class TokenizerArguments:
    output_dir: str = field(metadata={"help": "Folder to save the tokenizer in (created; other files in it are kept)."})
    files: list[str] = field(
        default_factory=list,
        metadata={"help": "UTF-8 text files to train on. With neither --files nor --dataset: the embedded corpus "
                  "(CPython's own documentation, pydoc_data.topics, ~465k characters)."},
    )
    dataset: str | None = field(
        default=None,
        metadata={"help": "Instead of --files: a folder written by Dataset.save_to_disk, or a .json/.jsonl/.csv/"
                  ".parquet file, read with `datasets`."},
    )
    text_column: str = field(default="text", metadata={"help": "Column holding the text when --dataset is used."})
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
    merges_table: int = field(default=50, metadata={"help": "Rows of merges_table.md (0: skip; replays the corpus in Python)."})
    no_progress: bool = field(default=False, metadata={"help": "Hide the trainer's progress bars."})


def parse_args(argv: list[str] | None = None) -> TokenizerArguments:
    (args,) = parse_config_args((TokenizerArguments,), argv, __doc__.split("\n\n")[0])
    if args.files and args.dataset:
        raise ValueError("give --files or --dataset, not both")
    return args


def load_source(args: TokenizerArguments):
    """Paths for --files; a `datasets.Dataset` for --dataset; else the embedded corpus."""
    if not args.files and not args.dataset:
        return EMBEDDED_CORPUS
    if args.files:
        return [Path(f) for f in args.files]
    import datasets

    path = Path(args.dataset)
    if path.is_dir():
        return datasets.load_from_disk(str(path))
    formats = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
    if path.suffix not in formats:
        raise ValueError(f"--dataset {path}: expected a save_to_disk folder or one of {sorted(formats)}")
    if not path.is_file():
        raise ValueError(f"--dataset {path} does not exist")
    return datasets.load_dataset(formats[path.suffix], data_files=str(path), split="train")


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
        write_views(tokenizer, source, args)
    except (ValueError, OSError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"trained {len(tokenizer)} tokens in {seconds:.1f} s; saved to {args.output_dir}")
    return 0


def write_views(tokenizer, source, args: TokenizerArguments) -> None:
    """merges_table.md, token_boundaries.html and merge_trace.png beside the tokenizer."""
    output_dir = Path(args.output_dir)
    if args.trace_word:
        save_figure(merge_trace_figure(merge_trace(tokenizer, args.trace_word)), output_dir / "merge_trace.png")
    texts, _ = iter_texts(source, args.text_column)
    head = next(texts, "")[:3000]
    atomic_write_text(output_dir / "token_boundaries.html", token_boundaries_html(tokenizer, head))
    if args.merges_table > 0:
        texts, _ = iter_texts(source, args.text_column)
        table = format_merge_table(merge_table(tokenizer, texts, args.merges_table))
        atomic_write_text(output_dir / "merges_table.md", f"# First {args.merges_table} merges\n\n{table}\n")
        print(table)


if __name__ == "__main__":
    sys.exit(main())
