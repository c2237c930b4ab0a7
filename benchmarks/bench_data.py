"""Throughput of the data pipeline (text → model-ready windows) against the book's approach.

    python benchmarks/bench_data.py                                   # ~20 MB, context 256, stride 128
    python benchmarks/bench_data.py --repeat_mb 2                     # a quick run
    python benchmarks/bench_data.py --repeats 3                       # on a busy machine: medians
    python benchmarks/bench_data.py --context_length 1024 --stride 512

Corpus: tinyshakespeare repeated to about `--repeat_mb` MB, written to a temporary file.

The book (rasbt/LLMs-from-scratch, `GPTDatasetV1`): tiktoken's GPT-2 encoding of the whole text
(built from shared/data/gpt2, the same merges as ours), then a Python loop that builds one
input tensor and one target tensor per window.

Ours: the real pipeline, `training.data.windows.build_lm_datasets` on the file with the GPT-2 tokenizer
(`tokenization.load_gpt2_tokenizer`), in a fresh `datasets` cache, so everything is computed:
reading, tokenizing, writing Arrow, cutting windows. Its two stages are also timed on their own
(load + tokenize; windowing), and the pure `sliding_windows` on the same ids. A second, warm run
shows the cache at work. Throughput is corpus tokens per second for every stage, so the numbers
add up; the ratios compare stages measured in the same run (a loaded machine slows both sides).
Goals: windowing >= 20x the book's loop, end to end >= 3x the book's.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import datasets
import numpy as np
import torch
from common import SHARED_DATA, check_at_least, check_data_dir, load_average, median_ratio, timed

from tokenization import EOS_TOKEN, gpt2_tiktoken_encoding, load_gpt2_tokenizer
from tokenization.fast_encode import tiktoken_twin
from training.cli import USER_ERRORS, parse_config_args, report_error
from training.data.windows import build_lm_datasets, load_corpus, sliding_windows, tokenize_documents, window_dataset


@dataclass
class BenchArguments:
    repeat_mb: float = field(
        default=20.0, metadata={"help": "Corpus size in MB: tinyshakespeare repeated to about this."}
    )
    context_length: int = field(
        default=256, metadata={"help": "Tokens the model reads per window (the book's max_length)."}
    )
    stride: int = field(
        default=128, metadata={"help": "Tokens between window starts (the book's default: half a window)."}
    )
    num_proc: int | None = field(
        default=None, metadata={"help": "Tokenization processes (default: one, with encoder threads)."}
    )
    repeats: int = field(default=1, metadata={"help": "Repetitions (book and ours alternate); medians are reported."})
    data_dir: str = field(default=str(SHARED_DATA), metadata={"help": "Folder with tinyshakespeare.txt and gpt2/."})

    def __post_init__(self) -> None:
        if self.repeat_mb <= 0:
            raise ValueError(f"--repeat_mb must be > 0, got {self.repeat_mb}")
        check_at_least(self, 1, "context_length", "stride", "num_proc", "repeats")
        if self.stride > self.context_length:
            raise ValueError(f"--stride must be <= --context_length, got {self.stride} and {self.context_length}")
        check_data_dir(self.data_dir, "tinyshakespeare.txt", "gpt2")


def book_windows(ids: list[int], context_length: int, stride: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The book's GPTDatasetV1 loop, verbatim in substance."""
    inputs, targets = [], []
    for i in range(0, len(ids) - context_length, stride):
        inputs.append(torch.tensor(ids[i : i + context_length]))
        targets.append(torch.tensor(ids[i + 1 : i + context_length + 1]))
    return inputs, targets


def main(argv: list[str] | None = None) -> int:
    try:
        (args,) = parse_config_args((BenchArguments,), argv, __doc__.split("\n\n")[0])
    except USER_ERRORS as error:
        return report_error(error)
    data_dir = Path(args.data_dir)
    shakespeare = (data_dir / "tinyshakespeare.txt").read_text(encoding="utf-8")
    copies = max(1, round(args.repeat_mb * 1e6 / len(shakespeare.encode("utf-8"))))
    work = Path(tempfile.mkdtemp(prefix="bench_data_"))
    corpus = work / "corpus.txt"
    corpus.write_text(shakespeare * copies, encoding="utf-8")
    gpt2 = data_dir / "gpt2"
    tokenizer = load_gpt2_tokenizer(gpt2 / "encoder.json", gpt2 / "vocab.bpe")
    encoding = gpt2_tiktoken_encoding(gpt2 / "encoder.json", gpt2 / "vocab.bpe")
    L, stride = args.context_length, args.stride
    datasets.disable_progress_bars()
    print(f"corpus: tinyshakespeare x {copies} = {corpus.stat().st_size / 1e6:.1f} MB; context {L}, stride {stride}")
    engine = "tiktoken twin" if tiktoken_twin(tokenizer) is not None else "tokenizers"
    print(
        f"pipeline encoder: tokenization.encode_batch_fast ({engine}); "
        f"load average {load_average()} (1, 5, 15 min) on {os.cpu_count()} CPUs"
    )

    timings: dict[str, list[float]] = defaultdict(list)
    for repetition in range(args.repeats):
        # Book and ours alternate, so a machine busy with other work slows both sides alike.
        ids, t, _ = timed(encoding.encode, corpus.read_text(encoding="utf-8"), allowed_special={EOS_TOKEN})
        timings["book: tiktoken encode"].append(t)

        cache = work / f"cache_e2e_{repetition}"  # fresh: everything is computed
        run = partial(
            build_lm_datasets,
            [corpus],
            tokenizer,
            context_length=L,
            stride=stride,
            validation_fraction=0,
            num_proc=args.num_proc,
            cache_dir=cache,
        )
        splits, t, _ = timed(run)
        timings["ours: end to end (cold)"].append(t)

        (inputs, _), t, _ = timed(book_windows, ids, L, stride)
        timings["book: window loop (tensors)"].append(t)
        timings["book: end to end"].append(timings["book: tiktoken encode"][-1] + t)

        cache = work / f"cache_stages_{repetition}"
        documents, t, _ = timed(load_corpus, [corpus], cache_dir=cache)
        timings["ours: read + store documents"].append(t)
        tokens, t, _ = timed(tokenize_documents, documents, tokenizer, num_proc=args.num_proc)
        timings["ours: tokenize"].append(t)
        windows, t, _ = timed(window_dataset, tokens, L, stride, cache_dir=cache)
        timings["ours: windows (datasets.map)"].append(t)
        flat = np.asarray(ids, dtype=np.int32)
        _, t, _ = timed(lambda stream: torch.from_numpy(np.ascontiguousarray(sliding_windows(stream, L, stride))), flat)
        timings["ours: sliding_windows alone"].append(t)
        _, t, _ = timed(run)
        timings["ours: end to end (warm cache)"].append(t)

    # Same tokens and windows as the book (ours ends the document with one <|endoftext|>).
    ours = np.asarray(windows.with_format("numpy")[:]["input_ids"])
    stream = np.concatenate(tokens.with_format("numpy")["input_ids"])
    assert np.array_equal(stream, [*ids, tokenizer.eos_token_id]), "tokens differ from tiktoken's"
    assert np.array_equal(ours[: len(inputs), :-1], torch.stack(inputs).numpy()), "windows differ from the book's"
    assert len(splits["train"]) == len(ours) in (len(inputs), len(inputs) + 1)

    n = len(ids)
    print(f"\n{n / 1e6:.2f} M tokens, {len(ours)} windows; median of {args.repeats} repetition(s)\n")
    print(f"{'stage':32s} {'seconds':>8s} {'Mtok/s':>8s}")
    for name in sorted(timings, key=lambda k: (not k.startswith("book"), k)):
        seconds = statistics.median(timings[name])
        print(f"{name:32s} {seconds:8.3f} {n / seconds / 1e6:8.2f}")

    def ratio(numerator: str, denominator: str) -> float:
        return median_ratio(timings[numerator], timings[denominator])

    print()
    windowing = ratio("book: window loop (tensors)", "ours: windows (datasets.map)")
    print(f"windowing, ours / book loop:  {windowing:6.1f}x   (goal >= 20x)")
    print(f"end to end, ours / book:      {ratio('book: end to end', 'ours: end to end (cold)'):6.1f}x   (goal >= 3x)")
    print(f"tokenizing, ours / tiktoken:  {ratio('book: tiktoken encode', 'ours: tokenize'):6.2f}x")
    load = os.getloadavg()[0]
    if load > 1:
        print(f"\nnote: the machine was busy (load average {load:.1f}); ratios compare stages run side by side")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
