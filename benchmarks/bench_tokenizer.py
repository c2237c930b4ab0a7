"""Tokenizer benchmark: training time and encoding throughput, each against a reference run here.

    python benchmarks/bench_tokenizer.py              # full: tinyshakespeare and ~20 MB, 3 rounds (~10 min loaded)
    python benchmarks/bench_tokenizer.py --quick      # smoke run: ~2 MB, 2 rounds, small reference training

Training: `tokenizers`' trainer (`tokenization.train_bpe`) against the pure-Python reference
(`tokenization.reference_bpe.train_reference_bpe`), same corpus and settings; merge lists compared.

Encoding, on the whole text, with a tokenizer trained on tinyshakespeare (`--vocab_size`) and with
GPT-2's: tiktoken built from the same merges encoding the text as one string is the reference
(ratio 1.00). Compared: `tokenizers` on one string, HF `tokenizer(batch)`, the Rust backend's
`encode_batch_fast`, and the pipeline's path `tokenization.encode_batch_fast` (1 and `--threads`
threads), batched over paragraphs and over the 64 KiB pieces `training.data.windows` cuts files into.
Goal: the pipeline's path >= 1.00. Every path's ids are checked equal.

What limits `tokenizers` (sequential calls per paragraph, one thread, CPU seconds): full encode;
without offsets; with the BPE model swapped for a one-entry WordLevel (pre-tokenizer and
bookkeeping, no merges); with a 100x larger BPE word cache; and tiktoken on the same texts.

Times are the best of `--rounds` interleaved rounds, as wall-clock and as CPU seconds of the
process (all threads). On a shared machine wall-clock ratios swing with the load (printed);
CPU-second ratios say how much work each path does: a path with the reference's CPU time that
runs on two threads takes half its wall time on two free cores.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from common import SHARED_DATA, check_at_least, check_data_dir, interleaved, load_average, timed
from tokenizers import Tokenizer, models

from tokenization import (
    encode_batch_fast,
    gpt2_tiktoken_encoding,
    learned_merges,
    load_gpt2_tokenizer,
    tiktoken_encoding,
    train_bpe,
    train_reference_bpe,
)
from tokenization.corpus import read_utf8_chunks
from tokenization.fast_encode import tiktoken_twin
from tokenization.train import BYTE_ALPHABET_SIZE, SPECIAL_TOKENS
from training.cli import USER_ERRORS, parse_config_args, report_error
from training.data.windows import PIECE_CHARS


@dataclass
class BenchArguments:
    data_dir: str = field(default=str(SHARED_DATA), metadata={"help": "Folder with tinyshakespeare.txt and gpt2/."})
    repeat_mb: float = field(
        default=20.0, metadata={"help": "Size of the large text in MB (tinyshakespeare repeated)."}
    )
    vocab_size: int = field(
        default=8192, metadata={"help": "Vocabulary of the tokenizer trained for the encoding runs."}
    )
    train_vocab_size: int = field(
        default=1024,
        metadata={
            "help": "Vocabulary for the training-time comparison (the "
            "Python reference's time grows with merges x distinct pairs)."
        },
    )
    rounds: int = field(default=3, metadata={"help": "Interleaved timing rounds; the best time of each path is kept."})
    threads: int = field(default=2, metadata={"help": "Threads for the batched paths."})
    batch_size: int = field(
        default=64, metadata={"help": "Texts per encode call (training.data.windows.tokenize_documents' batch)."}
    )
    quick: bool = field(default=False, metadata={"help": "Smoke run: --repeat_mb 2 --rounds 2 --train_vocab_size 400."})

    def __post_init__(self) -> None:
        if self.repeat_mb < 0:
            raise ValueError(f"--repeat_mb must be >= 0 (0: tinyshakespeare once), got {self.repeat_mb}")
        check_at_least(self, BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS), "vocab_size", "train_vocab_size")
        check_at_least(self, 1, "rounds", "threads", "batch_size")
        check_data_dir(self.data_dir, "tinyshakespeare.txt", "gpt2")


def paragraphs_of(text: str) -> list[str]:
    """Cut before each blank line that follows a non-space character: GPT-2 pre-tokenization
    always splits there, so the paragraphs hold exactly the tokens of the whole text."""
    return re.split(r"(?<=\S)(?=\n\n)", text)


def batched(texts: list[str], size: int) -> list[list[str]]:
    return [texts[i : i + size] for i in range(0, len(texts), size)]


def bench_training(name: str, text: str, vocab_size: int) -> None:
    library, t_library, _ = timed(train_bpe, [text], vocab_size, show_progress=False)
    reference, t_reference, _ = timed(train_reference_bpe, [text], vocab_size)
    same = learned_merges(library) == reference.merges
    print(
        f"  {name:<16} {len(text.encode()) / 1e6:6.1f} MB  tokenizers {t_library:7.2f} s   "
        f"pure Python {t_reference:8.2f} s"
        f"   ratio {t_reference / t_library:6.1f}x   same {len(reference.merges)} merges: {same}"
    )


def bench_encoding(label: str, tokenizer, text: str, path: Path, args: BenchArguments) -> None:
    """Every encoding path on `text`, timed in interleaved rounds, against tiktoken on one string."""
    twin = tiktoken_twin(tokenizer)
    reference = tiktoken_encoding(tokenizer) if twin is None else twin
    backend = tokenizer.backend_tokenizer
    paragraphs = batched(paragraphs_of(text), args.batch_size)
    pieces = batched(list(read_utf8_chunks(path, PIECE_CHARS)), args.batch_size)
    ids_of = {
        "twin": lambda batches, threads: [
            i for b in batches for i in encode_batch_fast(tokenizer, b, num_threads=threads)
        ],
        "rust": lambda batches: [
            e.ids for b in batches for e in backend.encode_batch_fast(b, add_special_tokens=False)
        ],
    }
    paths: dict[str, Callable[[], int]] = {
        "tiktoken, one string (reference)": lambda: len(reference.encode_ordinary(text)),
        "tokenizers, one string": lambda: len(backend.encode(text, add_special_tokens=False).ids),
        "HF tokenizer(batch), paragraphs": lambda: sum(
            len(ids) for b in paragraphs for ids in tokenizer(b, add_special_tokens=False)["input_ids"]
        ),
        "Rust encode_batch_fast, paragraphs": lambda: sum(map(len, ids_of["rust"](paragraphs))),
        "Rust encode_batch_fast, 64K pieces": lambda: sum(map(len, ids_of["rust"](pieces))),
        "pipeline encode_batch_fast, paragraphs, 1 thread": lambda: sum(map(len, ids_of["twin"](paragraphs, 1))),
        f"pipeline encode_batch_fast, paragraphs, {args.threads} threads": lambda: sum(
            map(len, ids_of["twin"](paragraphs, args.threads))
        ),
        f"pipeline encode_batch_fast, 64K pieces, {args.threads} threads": lambda: sum(
            map(len, ids_of["twin"](pieces, args.threads))
        ),
    }
    timings = interleaved(paths, args.rounds, warmup=0, show=False)
    walls = {name: min(seconds) for name, seconds in timings.wall.items()}
    cpus = {name: min(seconds) for name, seconds in timings.cpu.items()}
    tokens = timings.results
    megabytes = len(text.encode()) / 1e6
    reference_name = "tiktoken, one string (reference)"
    engine = "tiktoken twin" if twin is not None else "tokenizers (no twin)"
    print(f"\n  {label}: {megabytes:.1f} MB, {tokens['tokenizers, one string']:,} tokens; pipeline engine: {engine}")
    print(f"    {'path':<52} {'wall':>7} {'MB/s':>7} {'Mtok/s':>7} {'x wall':>7} {'CPU s':>7} {'x CPU':>6}")
    for name in paths:
        wall = walls[name]
        print(
            f"    {name:<52} {wall:7.2f} {megabytes / wall:7.2f} {tokens[name] / wall / 1e6:7.2f} "
            f"{walls[reference_name] / wall:7.2f} {cpus[name]:7.2f} {cpus[reference_name] / cpus[name]:6.2f}"
        )
    same = ids_of["twin"](paragraphs, args.threads) == ids_of["rust"](paragraphs)
    counts = len(set(tokens.values())) == 1
    print(f"    ids identical (pipeline vs Rust, paragraphs): {same}; token counts identical across paths: {counts}")


def bench_limits(tokenizer, text: str, rounds: int) -> None:
    """Where `tokenizers` spends its time, with sequential single-text calls (one thread)."""
    backend = tokenizer.backend_tokenizer
    paragraphs = paragraphs_of(text)
    model = json.loads(backend.to_str())["model"]
    big_cache = Tokenizer.from_str(backend.to_str())
    big_cache.model = models.BPE(model["vocab"], [tuple(m) for m in model["merges"]], cache_capacity=1_000_000)
    # Everything but the merges: each pre-token becomes one unknown-word id.
    no_merges = Tokenizer.from_str(backend.to_str())
    no_merges.model = models.WordLevel({"<unk>": 0}, unk_token="<unk>")
    twin = tiktoken_encoding(tokenizer)
    paths = {
        "full encode (offsets, Encoding objects)": lambda: sum(len(backend.encode(p).ids) for p in paragraphs),
        "encode_batch_fast one text at a time (no offsets)": lambda: sum(
            len(e.ids) for p in paragraphs for e in backend.encode_batch_fast([p])
        ),
        "pre-tokenizer + bookkeeping, no BPE (WordLevel model)": lambda: sum(
            len(no_merges.encode(p).ids) for p in paragraphs
        ),
        "full encode, BPE word cache 1,000,000": lambda: sum(len(big_cache.encode(p).ids) for p in paragraphs),
        "tiktoken, same texts": lambda: sum(len(twin.encode_ordinary(p)) for p in paragraphs),
    }
    times = {name: min(timed(fn).cpu for _ in range(rounds)) for name, fn in paths.items()}
    full = times["full encode (offsets, Encoding objects)"]
    megabytes = len(text.encode()) / 1e6
    print(
        f"\n  what limits tokenizers (GPT-2 merges, {megabytes:.1f} MB in {len(paragraphs):,} paragraphs, "
        "sequential calls, CPU seconds):"
    )
    for name, seconds in times.items():
        print(f"    {name:<52} {seconds:7.2f} s {megabytes / seconds:7.2f} MB/s   {seconds / full:6.0%} of full encode")


def main(argv: list[str] | None = None) -> int:
    try:
        (args,) = parse_config_args((BenchArguments,), argv, __doc__.split("\n\n")[0])
    except USER_ERRORS as error:
        return report_error(error)
    if args.quick:
        args.repeat_mb, args.rounds, args.train_vocab_size = 2.0, 2, 400
    data_dir = Path(args.data_dir)
    shakespeare = (data_dir / "tinyshakespeare.txt").read_text(encoding="utf-8")
    copies = max(1, round(args.repeat_mb * 1e6 / len(shakespeare.encode())))
    large = shakespeare * copies
    work = Path(tempfile.mkdtemp(prefix="bench_tokenizer_"))
    (work / "small.txt").write_text(shakespeare, encoding="utf-8")
    (work / "large.txt").write_text(large, encoding="utf-8")
    print(
        f"load average {load_average()} (1, 5, 15 min) on {os.cpu_count()} CPUs; tinyshakespeare x {copies} = "
        f"{len(large.encode()) / 1e6:.1f} MB; best of {args.rounds} rounds"
    )

    print(f"\ntraining time, vocab_size={args.train_vocab_size}:")
    bench_training("tinyshakespeare", shakespeare, args.train_vocab_size)
    bench_training(f"x{copies}", large, args.train_vocab_size)

    print("\nencoding throughput (x = speed relative to tiktoken on one string, same merges):")
    trained = train_bpe([shakespeare], args.vocab_size, show_progress=False)
    gpt2 = load_gpt2_tokenizer(data_dir / "gpt2" / "encoder.json", data_dir / "gpt2" / "vocab.bpe")
    gpt2_reference = gpt2_tiktoken_encoding(data_dir / "gpt2" / "encoder.json", data_dir / "gpt2" / "vocab.bpe")
    same = gpt2_reference.encode_ordinary(shakespeare) == tiktoken_twin(gpt2).encode_ordinary(shakespeare)
    print(f"  GPT-2 twin built from our tokenizer == tiktoken's own loader on tinyshakespeare: {same}")
    for name, tokenizer in ((f"trained, vocab {len(trained)}", trained), ("GPT-2", gpt2)):
        bench_encoding(f"{name}, tinyshakespeare", tokenizer, shakespeare, work / "small.txt", args)
        bench_encoding(f"{name}, x{copies}", tokenizer, large, work / "large.txt", args)

    bench_limits(gpt2, shakespeare, args.rounds)
    for path in work.iterdir():
        path.unlink()
    work.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
