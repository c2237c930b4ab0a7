"""Pretraining data: text → documents → token pieces → sliding windows, cached by `datasets`.

Each stage is a `datasets` object, so processed data is cached on disk under a fingerprint and a
second run reads it back instead of re-tokenizing:

    load_corpus          any source `tokenization.corpus.open_source` accepts
                         → documents: rows `text`, `doc_id`, `doc_end`
    tokenize_documents   → pieces of ids: rows `input_ids`, `doc_id`; `<|endoftext|>` after
                           each document, so the documents form one flat token stream
    window_dataset       → windows: rows `input_ids` (context_length + 1 tokens), `doc_id`,
                           `offset` (where in its document the window starts)
    build_lm_datasets    all of the above, plus the checks and a train/validation split
    read_pretraining_text, pretraining_windows
                         a pretraining run's data: its flags' sources, identified once, split,
                         windowed and saved (see "Identity and caching" below)

(`training.data.collate.collate_windows` turns a batch of windows into model inputs; `split_indices`
holds out a seeded share of labelled records, for SFT and classification.)

Windows hold context_length + 1 tokens: the model reads the first T = context_length and each
position's target is the next token (`shift_labels`, the convention of transformers'
`ForCausalLMLoss`), so every position of every window is scored, as in the book.

Documents and pieces: a file is one document (or several, split on `doc_separator`), read in
pieces of about `chunk_chars` characters cut only where GPT-2's pre-tokenizer always splits
(`tokenization.corpus.read_utf8_chunks`), so a byte-level BPE gives the same ids for the pieces
as for the whole document, while a 1 GB file is never one string and its pieces tokenize in
parallel. A row of a datasets dataset, or a text from an iterable, is one document.
Whitespace-only documents are skipped; `doc_id` still counts them, so it names the source row.

Windowing: `sliding_windows` is a pure function of (ids, context_length, stride). A map batch
cannot see the tokens of the next batch, so the flat stream is first cut into *blocks* that
each hold whole windows (consecutive blocks overlap by context_length + 1 - stride tokens), and
`datasets.map(batched=True)` applies `sliding_windows` to each block. The same generator and
map serve `streaming=True`, so both modes give the same windows.

Identity and caching: a source is identified once (`source_identity`: each file's SHA-256, a
hash of texts, a dataset's name or its own fingerprint), and that one identity serves every
cache and a run's resume fingerprint. Each stage adds its parameters and the tokenizer's hash to
the source's content hash, and `datasets` stores every stage as Arrow files under `cache_dir`.
Writes go to temporary files renamed on success, so a failed run leaves no half-written cache.
Bump `PIPELINE_VERSION` when a change alters the output of a stage.

A pretraining run's data, in two steps because its tokenizer may be trained on the training
part in between: `read_pretraining_text` opens, identifies and splits --train_file /
--validation_file (the three split modes: characters, tokens, documents), and
`pretraining_windows` turns that into training and validation windows, saved once
(`saved_windows`) in a folder named by what they are made of, not by file names and dates.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from functools import partial
from pathlib import Path
from typing import Any, Literal

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, DatasetDict, Features, IterableDataset, IterableDatasetDict, List, Value, load_from_disk
from datasets.exceptions import DatasetGenerationError
from transformers import PreTrainedTokenizerBase

from modeling_minigpt.files import file_sha256, replace_dir, staging_dir
from tokenization import EOS_TOKEN, encode_batch_fast
from tokenization.corpus import (
    EMBEDDED_CORPUS,
    RECORD_FILE_BUILDERS,
    DataError,
    Source,
    check_file,
    check_text_column,
    checked_texts,
    describe_files,
    describe_source,
    embedded_documents,
    iter_column,
    open_source,
    read_text,
    read_utf8_chunks,
)
from tokenization.load import check_tokenizer, load_tokenizer, short_hash, tokenizer_fingerprint

PathLike = str | os.PathLike
AnyDataset = Dataset | IterableDataset

# Part of every cache fingerprint: bump it when a change alters what a stage produces.
PIPELINE_VERSION = "data-v1"
# 64 K characters (~16 K tokens) per piece: small enough that a 20 MB file gives a few hundred
# pieces to tokenize in parallel, large enough that per-call overhead is negligible.
PIECE_CHARS = 1 << 16
# Each block yields about this many window tokens (4 MB of int32), whatever the stride.
BLOCK_WINDOW_TOKENS = 1 << 20

DOCUMENT_FEATURES = Features({"text": Value("string"), "doc_id": Value("int64"), "doc_end": Value("bool")})
TOKEN_FEATURES = Features({"input_ids": List(Value("int32")), "doc_id": Value("int64")})
# Blocks of the token stream, each holding whole windows (see `_token_blocks`). Yielded without
# declared features: `datasets` then writes the numpy arrays directly (declared features make it
# encode them element by element, 30x slower).
BLOCK_COLUMNS = ("ids", "start", "doc_starts", "doc_ids")


def window_features(context_length: int) -> Features:
    return Features(
        {
            "input_ids": List(Value("int32"), length=context_length + 1),
            "doc_id": Value("int64"),  # document of the window's first token
            "offset": Value("int64"),  # token offset of the window's first token in that document
        }
    )


# ----------------------------------------------------------------------------- windows (pure)


def count_windows(n_tokens: int, context_length: int, stride: int) -> int:
    """Windows of context_length + 1 tokens starting every `stride` tokens in n_tokens tokens."""
    window = context_length + 1
    return 0 if n_tokens < window else (n_tokens - window) // stride + 1


def sliding_windows(ids: np.ndarray, context_length: int, stride: int) -> np.ndarray:
    """All windows of context_length + 1 tokens starting at 0, stride, 2·stride, ... of `ids`.

    Returns a read-only strided view [n_windows, context_length + 1] (no copy): row i is
    ids[i·stride : i·stride + context_length + 1]. Same windows as the book's loop
    `for i in range(0, len(ids) - context_length, stride)`; stride < context_length overlaps.
    """
    window = context_length + 1
    if len(ids) < window:
        return np.empty((0, window), dtype=ids.dtype)
    return np.lib.stride_tricks.sliding_window_view(ids, window)[::stride]


def check_window_args(context_length: int, stride: int) -> None:
    if context_length < 1:
        raise DataError(f"context_length must be at least 1, got {context_length}")
    if not 1 <= stride <= context_length:
        raise DataError(
            f"stride must be in [1, context_length={context_length}], got {stride} "
            "(stride = context_length: no overlap; smaller: windows overlap)"
        )


# ----------------------------------------------------------------------------- tokenizer


def check_pipeline_tokenizer(tokenizer: PreTrainedTokenizerBase | PathLike | None) -> int:
    """Refuse a tokenizer the pipeline cannot use; return the `<|endoftext|>` id.

    It must be a fast tokenizer (the batched Rust encoder does the work), and its eos token must
    be `<|endoftext|>`, the document separator. (Whether it fits a model is
    `tokenization.load.check_tokenizer`.)
    """
    tokenizer = load_tokenizer(tokenizer)
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise DataError(f"{type(tokenizer).__name__} is not a fast tokenizer: use a PreTrainedTokenizerFast")
    if tokenizer.eos_token != EOS_TOKEN or tokenizer.eos_token_id is None:
        raise DataError(
            f"the tokenizer's eos token is {tokenizer.eos_token!r}, but documents are joined with {EOS_TOKEN!r}: "
            "use a tokenizer whose eos token is <|endoftext|> (tokenization.train_bpe and the GPT-2 tokenizer are)"
        )
    return tokenizer.eos_token_id


# ----------------------------------------------------------------------------- what a source is


@dataclass(frozen=True)
class SourceIdentity:
    """What a data source is, found once (`source_identity`): one record for a run's fingerprint and
    one content hash for the caches, both from the same single hashing of each file."""

    # For a run's resume fingerprint: a file's resolved path, size and SHA-256; a folder's path and each
    # of its files' SHA-256; else the source as given (a dataset name, the embedded corpus). Run folders
    # have held this form since before the layout move, so a run started then still matches.
    record: dict[str, Any] | str
    # What the source holds, not where it lives (a copied or touched file keeps it, an edited one does
    # not): it names the saved windows and the documents' datasets cache. None for a dataset known by
    # name, whose content is its own `datasets` fingerprint once it is loaded.
    content: str | None


def source_identity(source: PathLike | Sequence[os.PathLike]) -> SourceIdentity:
    """The identity of a path, a dataset name, the embedded corpus or a list of files. Each file is
    read once, to hash it at disk speed (about 1 ms per MB, `modeling_minigpt.files.file_sha256`;
    tokenizing it costs far more); the embedded corpus is hashed in memory; nothing is loaded.
    A folder's files are its every file, in sorted order, so a folder of one file holds what that
    file holds."""
    if isinstance(source, (list, tuple)):
        digests = {str(Path(path).resolve()): file_sha256(path) for path in source}
        return SourceIdentity({"files": digests}, short_hash("files", list(digests.values())))
    if source == EMBEDDED_CORPUS:
        return SourceIdentity(source, short_hash("texts", _hash_texts(embedded_documents())))
    path = Path(source)
    if path.is_file():
        digest = file_sha256(path)
        record = {"path": str(path.resolve()), "size": path.stat().st_size, "sha256": digest}
        return SourceIdentity(record, short_hash("files", [digest]))
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file())
        digests = {str(f.relative_to(path)): file_sha256(f) for f in files}
        return SourceIdentity(
            {"path": str(path.resolve()), "files": digests}, short_hash("files", list(digests.values()))
        )
    return SourceIdentity(str(source), None)  # a dataset name (or a missing path, refused when it is opened)


# ----------------------------------------------------------------------------- corpus → documents


def load_corpus(
    source: Source,
    *,
    text_column: str = "text",
    split: str = "train",
    doc_separator: str | None = None,
    streaming: bool = False,
    cache_dir: PathLike | None = None,
    chunk_chars: int = PIECE_CHARS,
    what: str = "corpus file",
    identity: SourceIdentity | None = None,
) -> AnyDataset:
    """Documents of `source` as rows `text`, `doc_id`, `doc_end` (last piece of its document).

    `source` is anything `tokenization.corpus.open_source` accepts (`what` names it in messages);
    `identity`, its `source_identity` when the caller has it already (its files are then not
    hashed again to name the cache).
    A text file is one document, or several if `doc_separator` is given (then each document is
    held in memory whole); a row's `text_column` is a document; so is each text of an iterable
    (listed in memory unless streaming; with streaming a one-shot iterator can be iterated only
    once). With `streaming=True` nothing is read until iterated (an `IterableDataset`); otherwise
    the documents are written once to Arrow files under `cache_dir` (default: datasets' cache).
    """
    opened = open_source(source, split=split, streaming=streaming, cache_dir=cache_dir, what=what)
    dataset = opened.dataset
    if opened.files:
        generator = _file_documents
        gen_kwargs = {
            "paths": tuple(map(str, opened.files)),
            "doc_separator": doc_separator,
            "chunk_chars": chunk_chars,
        }
        # Named by content: a copied or touched file is not tokenized again, an edited one is.
        content = identity.content if identity is not None and identity.content else None
        if not streaming:
            content = content or source_identity(opened.files).content
        fingerprint = short_hash("files", content, doc_separator, chunk_chars)
    elif isinstance(dataset, Dataset):
        check_text_column(dataset, text_column)
        generator, gen_kwargs = _dataset_documents, {"dataset": dataset, "text_column": text_column}
        fingerprint = short_hash("dataset", dataset._fingerprint, text_column)
    elif isinstance(dataset, IterableDataset) and streaming:
        check_text_column(dataset, text_column)
        generator, gen_kwargs, fingerprint = _dataset_documents, {"dataset": dataset, "text_column": text_column}, None
    else:
        texts = opened.texts if dataset is None else iter_column(dataset, text_column)
        if not streaming or isinstance(texts, list):
            texts = tuple(texts)  # read once, to hash it; a tuple, because datasets shards list arguments
        fingerprint = None if streaming else short_hash("texts", _hash_texts(texts))
        generator, gen_kwargs = _text_documents, {"texts": texts, "where": "the texts"}

    if streaming:
        return IterableDataset.from_generator(generator, features=DOCUMENT_FEATURES, gen_kwargs=gen_kwargs)
    with _reraise_data_errors():
        return Dataset.from_generator(
            generator,
            features=DOCUMENT_FEATURES,
            gen_kwargs=gen_kwargs,
            cache_dir=_str(cache_dir),
            fingerprint=short_hash(fingerprint, PIPELINE_VERSION),
        )


def _file_documents(paths: tuple[str, ...], doc_separator: str | None, chunk_chars: int) -> Iterator[dict[str, Any]]:
    doc_id, n_documents = 0, 0
    for path in paths:
        pieces = read_utf8_chunks(Path(path), chunk_chars)
        documents = [pieces] if doc_separator is None else ([text] for text in _split_text(pieces, doc_separator))
        for document in documents:
            emitted = False
            for row in _document_rows(document, doc_id):
                emitted = True
                yield row
            n_documents += emitted
            doc_id += 1
    if n_documents == 0:
        raise DataError(f"the corpus {describe_files(paths)} is empty or whitespace-only: no document has any text")


def _split_text(pieces: Iterable[str], separator: str) -> Iterator[str]:
    """The documents between separators; a separator may straddle two pieces."""
    carry = ""
    for piece in pieces:
        *complete, carry = (carry + piece).split(separator)
        yield from complete
    yield carry


def _document_rows(pieces: Iterable[str], doc_id: int) -> Iterator[dict[str, Any]]:
    """One row per piece, `doc_end` on the last; nothing for a whitespace-only document."""
    previous: str | None = None
    has_text = False
    for piece in pieces:
        if previous is not None:
            yield {"text": previous, "doc_id": doc_id, "doc_end": False}
        previous = piece
        has_text = has_text or (bool(piece) and not piece.isspace())
    if previous is not None and has_text:
        yield {"text": previous, "doc_id": doc_id, "doc_end": True}


def _dataset_documents(dataset: AnyDataset, text_column: str) -> Iterator[dict[str, Any]]:
    yield from _text_documents(iter_column(dataset, text_column), where=f"column {text_column!r}")


def _text_documents(texts: Iterable[Any], where: str) -> Iterator[dict[str, Any]]:
    n_documents = 0
    for doc_id, text in enumerate(checked_texts(texts, where, item="document")):
        if text and not text.isspace():
            n_documents += 1
            yield {"text": text, "doc_id": doc_id, "doc_end": True}
    if n_documents == 0:
        raise DataError(f"the corpus ({where}) is empty or whitespace-only: no document has any text")


# ----------------------------------------------------------------------------- documents → tokens


def tokenize_documents(
    documents: AnyDataset,
    tokenizer: PreTrainedTokenizerBase | PathLike,
    *,
    num_proc: int | None = None,
    batch_size: int = 64,
) -> AnyDataset:
    """Token pieces `input_ids` (int32), `doc_id`; `<|endoftext|>` ends each document.

    Batches of `batch_size` pieces are encoded together by `tokenization.encode_batch_fast`
    (the tokenizer's tiktoken twin on all cores, or the Rust backend: the same ids either way);
    `num_proc` > 1 also splits the dataset across processes, each encoding on its share of the
    cores (not in streaming mode). Default (None): `auto_num_proc`. Any `num_proc` gives the
    same ids, in the same order.
    """
    tokenizer = load_tokenizer(tokenizer)
    eos_id = check_pipeline_tokenizer(tokenizer)
    kwargs: dict[str, Any] = dict(
        batched=True,
        batch_size=batch_size,
        remove_columns=["text", "doc_end"],
        features=TOKEN_FEATURES,
        fn_kwargs={"tokenizer": tokenizer, "eos_id": eos_id, "num_threads": None},
    )
    if isinstance(documents, IterableDataset):
        return documents.with_format("arrow").map(_tokenize_batch, **kwargs).with_format(None)
    num_proc = auto_num_proc(documents.num_rows) if num_proc is None else min(num_proc, documents.num_rows)
    kwargs["fn_kwargs"]["num_threads"] = max(1, (os.cpu_count() or 1) // num_proc)  # no oversubscription
    fingerprint = short_hash(documents._fingerprint, tokenizer_fingerprint(tokenizer), "tokenize", PIPELINE_VERSION)
    tokens = documents.with_format("arrow").map(
        _tokenize_batch,
        **kwargs,
        num_proc=num_proc,
        new_fingerprint=fingerprint,
        writer_batch_size=256,
        desc="Tokenizing",
    )
    return tokens.with_format(None)


def auto_num_proc(n_pieces: int) -> int:
    """Tokenizing processes for `n_pieces` pieces: one per CPU (at most 8), but each with at least
    16 pieces (1 MB of text) to do, since a process costs a second or two to start and one
    process already encodes on every core; so a corpus under 2 MB is tokenized in-process."""
    return max(1, min(os.cpu_count() or 1, 8, n_pieces // 16))


def _tokenize_batch(
    pieces: pa.Table, tokenizer: PreTrainedTokenizerBase, eos_id: int, num_threads: int | None
) -> pa.Table:
    """The datasets.map(batched=True) step: ids of each piece, `<|endoftext|>` after a document's
    last piece. Arrow in and out: `datasets` would otherwise walk every id in Python."""
    ids = encode_batch_fast(tokenizer, pieces.column("text").to_pylist(), num_threads=num_threads)
    doc_ends = pieces.column("doc_end").to_pylist()
    ids = [[*piece, eos_id] if doc_end else piece for piece, doc_end in zip(ids, doc_ends, strict=True)]
    return pa.table({"input_ids": pa.array(ids, pa.list_(pa.int32())), "doc_id": pieces.column("doc_id")})


def count_tokens(tokens: Dataset) -> int:
    """Length of the token stream of a (non-streaming) token dataset."""
    lengths = pc.list_value_length(tokens.with_format("arrow")[:]["input_ids"])
    return int(pc.sum(lengths).as_py() or 0)


# ----------------------------------------------------------------------------- validation split


def split_indices(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(kept, held_out) indices of n records: a seeded random `fraction` (at least one) is held out."""
    if n < 2:
        raise ValueError(f"need at least 2 records to hold some out, got {n}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_held = min(max(1, round(fraction * n)), n - 1)
    return sorted(order[n_held:]), sorted(order[:n_held])


def is_validation_document(doc_ids: np.ndarray, fraction: float) -> np.ndarray:
    """Which documents are held out: doc d iff floor((d+1)·fraction) > floor(d·fraction).

    That is every (1/fraction)-th document, spread evenly over the corpus (not its tail), exact
    in count, and decided per document: streaming and in-memory runs hold out the same ones.
    """
    f = Fraction(fraction).limit_denominator(1_000_000)
    d = np.asarray(doc_ids, dtype=np.int64)
    return (d + 1) * f.numerator // f.denominator > d * f.numerator // f.denominator


def _keep_documents(doc_ids: list[int], fraction: float, validation: bool) -> list[bool]:
    return (is_validation_document(np.asarray(doc_ids), fraction) == validation).tolist()


def split_documents(tokens: AnyDataset, fraction: float) -> tuple[AnyDataset, AnyDataset]:
    """(train, validation) token pieces, the validation documents chosen by `is_validation_document`."""
    parts = []
    for validation in (False, True):
        kwargs: dict[str, Any] = dict(
            input_columns="doc_id", batched=True, fn_kwargs={"fraction": fraction, "validation": validation}
        )
        if isinstance(tokens, Dataset):
            kwargs["new_fingerprint"] = short_hash(tokens._fingerprint, "split", fraction, validation, PIPELINE_VERSION)
        parts.append(tokens.filter(_keep_documents, **kwargs))
    return parts[0], parts[1]


# ----------------------------------------------------------------------------- tokens → windows


def window_dataset(
    tokens: AnyDataset,
    context_length: int,
    stride: int,
    *,
    token_range: tuple[int, int] | None = None,
    name: str = "the corpus",
    cache_dir: PathLike | None = None,
) -> AnyDataset:
    """Windows `input_ids` [context_length + 1], `doc_id`, `offset` over the flat token stream.

    Window i starts at stream position start + i·stride (start = token_range[0], default 0);
    only tokens inside `token_range` are used, so no window crosses its ends. Raises DataError
    (naming `name`) if the stream holds fewer than context_length + 1 tokens.
    """
    check_window_args(context_length, stride)
    windows_per_block = max(1, BLOCK_WINDOW_TOKENS // (context_length + 1))
    gen_kwargs = dict(
        tokens=tokens,
        context_length=context_length,
        stride=stride,
        windows_per_block=windows_per_block,
        token_range=token_range,
        name=name,
    )
    map_kwargs: dict[str, Any] = dict(
        batched=True,
        batch_size=1,
        remove_columns=list(BLOCK_COLUMNS),
        features=window_features(context_length),
        fn_kwargs={"context_length": context_length, "stride": stride},
    )
    if isinstance(tokens, IterableDataset):
        blocks = IterableDataset.from_generator(_token_blocks, gen_kwargs=gen_kwargs)
        return blocks.with_format("arrow").map(_windows_of_blocks, **map_kwargs).with_format(None)
    fingerprint = short_hash(
        tokens._fingerprint, "blocks", context_length, stride, windows_per_block, token_range, PIPELINE_VERSION
    )
    with _reraise_data_errors():
        blocks = Dataset.from_generator(
            _token_blocks, gen_kwargs=gen_kwargs, cache_dir=_str(cache_dir), fingerprint=fingerprint
        )
    windows = blocks.with_format("arrow").map(
        _windows_of_blocks, **map_kwargs, new_fingerprint=short_hash(fingerprint, "windows"), desc="Cutting windows"
    )
    return windows.with_format(None)


def iter_token_batches(
    tokens: AnyDataset, batch_size: int = 256
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The token stream of `tokenize_documents`' output in order, as (ids [N] int32, piece
    lengths [P], piece doc_ids [P]) for consecutive batches of `batch_size` pieces."""
    for table in tokens.with_format("arrow").iter(batch_size=batch_size):
        pieces = table.column("input_ids").combine_chunks()
        yield (
            pieces.flatten().to_numpy(zero_copy_only=False),
            pc.list_value_length(pieces).to_numpy(zero_copy_only=False),
            table.column("doc_id").to_numpy(),
        )


def _token_blocks(
    tokens: AnyDataset,
    context_length: int,
    stride: int,
    windows_per_block: int,
    token_range: tuple[int, int] | None,
    name: str,
) -> Iterator[dict[str, Any]]:
    """Cut the token stream (restricted to `token_range`) into blocks of whole windows.

    Block b holds tokens [b·K·stride, b·K·stride + (K-1)·stride + context_length + 1) of the
    range, i.e. exactly windows b·K ... b·K + K - 1 (K = windows_per_block); the last block holds
    whatever windows remain. Also tracks where documents begin, for each window's doc/offset.
    """
    begin, end = token_range if token_range is not None else (0, None)
    block_len = (windows_per_block - 1) * stride + context_length + 1
    advance = windows_per_block * stride
    buffer = np.empty(0, dtype=np.int32)
    buffer_start = begin  # stream position of buffer[0]
    doc_starts = np.empty(0, dtype=np.int64)  # stream positions where documents begin, ascending
    doc_ids = np.empty(0, dtype=np.int64)
    position, previous_doc = 0, -1  # stream position of the next piece, doc_id of the last piece
    for ids, lengths, pieces_doc in iter_token_batches(tokens):
        piece_starts = position + np.concatenate([[0], np.cumsum(lengths)[:-1]])
        starts_doc = pieces_doc != np.concatenate([[previous_doc], pieces_doc[:-1]])
        doc_starts = np.concatenate([doc_starts, piece_starts[starts_doc]])
        doc_ids = np.concatenate([doc_ids, pieces_doc[starts_doc]])
        previous_doc = pieces_doc[-1]
        lo = max(begin - position, 0)
        hi = len(ids) if end is None else min(end - position, len(ids))
        position += len(ids)
        if hi > lo:
            buffer = np.concatenate([buffer, ids[lo:hi]])
        while len(buffer) >= block_len:
            yield _block(buffer[:block_len], buffer_start, doc_starts, doc_ids)
            buffer, buffer_start = buffer[advance:], buffer_start + advance
            keep = max(np.searchsorted(doc_starts, buffer_start, side="right") - 1, 0)
            doc_starts, doc_ids = doc_starts[keep:], doc_ids[keep:]
        if end is not None and position >= end:
            break
    if len(buffer) >= context_length + 1:
        yield _block(buffer, buffer_start, doc_starts, doc_ids)
    elif buffer_start == begin:  # not one window in the whole range
        raise _too_short(name, len(buffer), context_length)


def _too_short(name: str, n_tokens: int, context_length: int) -> DataError:
    return DataError(
        f"{name} has {n_tokens} tokens, fewer than one window of context_length + 1 = {context_length + 1}: "
        "add text or lower context_length"
    )


def _block(ids: np.ndarray, start: int, doc_starts: np.ndarray, doc_ids: np.ndarray) -> dict[str, Any]:
    """A block row: `ids` from stream position `start`, and the documents it touches (their
    start positions and doc_ids; the first one may begin before the block)."""
    first = np.searchsorted(doc_starts, start, side="right") - 1
    stop = np.searchsorted(doc_starts, start + len(ids), side="left")
    return {
        "ids": ids.astype(np.int32, copy=False),
        "start": np.int64(start),
        "doc_starts": doc_starts[first:stop].astype(np.int64, copy=False),
        "doc_ids": doc_ids[first:stop].astype(np.int64, copy=False),
    }


def _windows_of_blocks(blocks: pa.Table, context_length: int, stride: int) -> pa.Table:
    """The datasets.map(batched=True) step: `sliding_windows` of each block, with doc/offset."""
    parts = []
    for row in range(blocks.num_rows):
        ids = blocks.column("ids")[row].values.to_numpy(zero_copy_only=False)
        doc_starts = blocks.column("doc_starts")[row].values.to_numpy(zero_copy_only=False)
        doc_ids = blocks.column("doc_ids")[row].values.to_numpy(zero_copy_only=False)
        windows = sliding_windows(ids, context_length, stride)  # (W, context_length + 1), a view
        starts = blocks.column("start")[row].as_py() + stride * np.arange(len(windows))  # (W,)
        doc = np.searchsorted(doc_starts, starts, side="right") - 1  # (W,) index into the block's docs
        parts.append((windows, doc_ids[doc], starts - doc_starts[doc]))
    windows, doc_id, offset = (
        np.concatenate(column) for column in zip(*parts, strict=True)
    )  # every block has a window
    return pa.table(
        {
            "input_ids": pa.FixedSizeListArray.from_arrays(
                pa.array(windows.reshape(-1), pa.int32()), context_length + 1
            ),
            "doc_id": pa.array(doc_id, pa.int64()),
            "offset": pa.array(offset, pa.int64()),
        }
    )


# ----------------------------------------------------------------------------- everything together


def build_lm_datasets(
    source: Source,
    tokenizer: PreTrainedTokenizerBase | PathLike | None,
    *,
    context_length: int,
    stride: int | None = None,
    validation_fraction: float = 0.1,
    split_by: Literal["documents", "tokens"] | None = None,
    text_column: str = "text",
    doc_separator: str | None = None,
    streaming: bool = False,
    num_proc: int | None = None,
    cache_dir: PathLike | None = None,
    vocab_size: int | None = None,
    identity: SourceIdentity | None = None,
) -> DatasetDict | IterableDatasetDict:
    """Model-ready windows of `source`: {"train": ..., "validation": ...} (no validation if 0).

    Args:
        source: see `load_corpus`.
        tokenizer: a fast tokenizer whose eos is `<|endoftext|>`, or its saved folder.
        context_length: T, the model's input length; windows hold T + 1 tokens.
        stride: tokens between window starts (default T: no overlap; < T overlaps).
        validation_fraction: share held out for validation, 0 for none.
        split_by: "tokens" holds out the last `validation_fraction` of the token stream (the
            book's split); "documents" holds out every (1/fraction)-th document (see
            `is_validation_document`). Default: "tokens", or "documents" when streaming
            (a stream's length is unknown). Either way no window crosses the boundary.
        streaming: IterableDatasets read lazily (corpora larger than memory); the same windows.
        num_proc: processes for tokenization (not used when streaming); default `auto_num_proc`.
        cache_dir: where `datasets` keeps the processed stages (default: its own cache).
        vocab_size: the model's vocabulary size, checked against the tokenizer.
        identity: the source's `source_identity`, when the caller found it already.

    Raises DataError, before anything is trained (and for streaming, after reading just enough
    to produce the first window of each split), for: an empty or whitespace-only corpus, one
    shorter than a window, non-UTF-8 files, a missing text column, a missing tokenizer or one
    whose eos or vocabulary size does not fit. With streaming, a bad byte further into a file
    is only met when it is read; the error still names the file and offset.
    """
    tokenizer = load_tokenizer(tokenizer)
    check_pipeline_tokenizer(tokenizer)
    if vocab_size is not None:
        check_tokenizer(tokenizer, vocab_size)
    stride = context_length if stride is None else stride
    check_window_args(context_length, stride)
    if not 0 <= validation_fraction < 1:
        raise DataError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    split_by = split_by or ("documents" if streaming else "tokens")
    if split_by not in ("documents", "tokens"):
        raise DataError(f"split_by must be 'documents' or 'tokens', got {split_by!r}")
    if streaming and split_by == "tokens" and validation_fraction > 0:
        raise DataError("split_by='tokens' needs the corpus length, unknown when streaming: use split_by='documents'")

    documents = load_corpus(
        source,
        text_column=text_column,
        doc_separator=doc_separator,
        streaming=streaming,
        cache_dir=cache_dir,
        identity=identity,
    )
    tokens = tokenize_documents(documents, tokenizer, num_proc=num_proc)
    corpus = f"the corpus {describe_source(source)}"
    n_tokens = None if streaming else count_tokens(tokens)
    if n_tokens is not None and n_tokens < context_length + 1:
        raise _too_short(corpus, n_tokens, context_length)
    window = dict(context_length=context_length, stride=stride, cache_dir=cache_dir)
    if validation_fraction == 0:
        splits = {"train": window_dataset(tokens, **window, name=corpus)}
    elif split_by == "documents":
        train, validation = split_documents(tokens, validation_fraction)
        held_out = f"the validation documents ({validation_fraction:.0%}; with few documents use split_by='tokens')"
        splits = {
            "train": window_dataset(train, **window, name="the training documents"),
            "validation": window_dataset(validation, **window, name=held_out),
        }
    else:
        cut = n_tokens - round(validation_fraction * n_tokens)
        splits = {
            "train": window_dataset(
                tokens, **window, token_range=(0, cut), name=f"the training range (first {cut} tokens)"
            ),
            "validation": window_dataset(
                tokens,
                **window,
                token_range=(cut, n_tokens),
                name=f"the validation range (last {n_tokens - cut} tokens)",
            ),
        }
    if streaming:
        for windows in splits.values():  # read up to the first window: fails now, not mid-training
            next(iter(windows))
        return IterableDatasetDict(splits)
    return DatasetDict(splits)


# ----------------------------------------------------------------------------- windows saved once


def saved_windows(folder: PathLike, build: Callable[[], Mapping[str, Dataset]]) -> tuple[DatasetDict, bool]:
    """(the windows saved in `folder`, True), or (the splits of `build()`, saved in `folder` now, False).

    `folder` names what the windows are made of (e.g. the `source_identity` content of the
    corpus, the tokenizer's hash, context length and stride), so a later run with the same inputs loads them
    (Arrow, memory-mapped: no process holds them all in memory) instead of tokenizing again.
    `save_to_disk` writes into a staging folder renamed into place when complete, so a killed
    build leaves nothing a later run would take for windows. With several processes, call it on
    the main process first (`accelerator.main_process_first()`): the others then load.
    Independent runs on the same inputs may build the same folder at once: each builds in its own
    staging folder, and the one that finishes second keeps the first one's windows (the same).
    """
    folder = Path(folder)
    reused = (folder / "dataset_dict.json").is_file()
    if not reused:
        splits = DatasetDict(build())
        staging = staging_dir(folder, unique=True)
        try:
            splits.save_to_disk(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if (folder / "dataset_dict.json").is_file():
            shutil.rmtree(staging)
        else:
            replace_dir(staging, folder)
    return load_from_disk(folder), reused


# ----------------------------------------------------------------------------- a pretraining run's data


@dataclass(frozen=True)
class PretrainingText:
    """A pretraining run's text before any tokenizer (`read_pretraining_text`): where its training
    and validation windows come from, and what each source is."""

    train: Source  # --train_file opened (nothing read yet), or its first characters ([text])
    validation_text: str | None  # the held-out text when it is one text: a --validation_file, the last characters
    validation_fraction: float  # held out of `train` by `split_by` when validation_text is None
    split_by: Literal["characters", "tokens", "documents"]
    identity: SourceIdentity  # of --train_file
    validation_identity: SourceIdentity | None  # of --validation_file
    content: str | None  # what --train_file holds (see `SourceIdentity.content`; a named dataset's fingerprint)
    source: str  # --train_file as given
    name: str  # --train_file in a few words
    descriptions: tuple[str, str]  # (training data, validation data) in words, for the printout and the card


def read_pretraining_text(
    train_file: str,
    *,
    validation_file: str | None = None,
    validation_fraction: float = 0.1,
    split_by: Literal["characters", "tokens", "documents"] = "tokens",
    streaming: bool = False,
) -> PretrainingText:
    """--train_file and --validation_file opened, identified and split, each file read once.

    Without a validation file, `validation_fraction` of train_file is held out, cut by `split_by`:
    "characters", its last characters (the file is read whole, once: the same bytes are hashed and
    decoded); "tokens", the last tokens, or "documents", every n-th document (`build_lm_datasets`,
    when it is tokenized: here it is only hashed). A validation file is read whole (it is scored
    whole at the end), once. Raises DataError for a missing or unreadable file, a file that is not
    UTF-8, or a held-out share outside (0, 1).
    """
    name = "CPython's documentation (pydoc_data.topics)" if train_file == EMBEDDED_CORPUS else Path(train_file).name
    validation_text, validation_identity = None, None
    if validation_file is not None:
        validation_text, validation_identity = _read_whole(validation_file, "--validation_file")
        descriptions = (name, Path(validation_file).name)
    elif not 0 < validation_fraction < 1:
        raise DataError(
            f"--validation_fraction must be in (0, 1) without a --validation_file, got {validation_fraction}"
        )
    elif split_by == "documents":
        held_out = f"{validation_fraction:.0%}"
        descriptions = (
            f"{name} without the held-out {held_out} of its documents",
            f"{held_out} of the documents of {name} (held out)",
        )
    else:
        kept, held_out = f"{1 - validation_fraction:.0%}", f"{validation_fraction:.0%}"
        descriptions = (f"first {kept} of the {split_by} of {name}", f"last {held_out} of the {split_by} of {name}")
    if split_by == "characters" and validation_file is None:
        text, identity = _read_whole(train_file, "--train_file")
        cut = len(text) - round(validation_fraction * len(text))
        train: Source = [text[:cut]]
        validation_text = text[cut:]
        content = identity.content
    else:
        train = open_source(train_file, streaming=streaming, what="--train_file")  # checked; a file is not read yet
        identity = source_identity(train_file)
        content = identity.content or (train.dataset._fingerprint if isinstance(train.dataset, Dataset) else None)
    return PretrainingText(
        train,
        validation_text,
        validation_fraction,
        split_by,
        identity,
        validation_identity,
        content,
        train_file,
        name,
        descriptions,
    )


def _read_whole(source: str, what: str) -> tuple[str, SourceIdentity]:
    """The whole text of a single text file (newlines normalised, as `read_text` gives it) and its
    identity, from one read of its bytes; or of the embedded corpus."""
    path = Path(source)
    if source == EMBEDDED_CORPUS or not path.is_file() or path.suffix.lower() in RECORD_FILE_BUILDERS:
        return read_text(source, what=what), source_identity(source)  # the embedded corpus, or read_text's refusal
    data = check_file(path, what).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        read_text(path, what=what)  # raises the DataError that names the file, the byte offset and the line
        raise
    digest = hashlib.sha256(data).hexdigest()
    record = {"path": str(path.resolve()), "size": len(data), "sha256": digest}
    return text.replace("\r\n", "\n").replace("\r", "\n"), SourceIdentity(record, short_hash("files", [digest]))


@dataclass
class PretrainingData:
    """The windowed splits of a `PretrainingText`, and how to describe them."""

    train: Dataset | IterableDataset
    validation: Dataset
    validation_text: str | None  # the whole held-out text, when it is known as text
    train_description: str
    validation_description: str
    origin: str  # where the windows come from, for the printout


def pretraining_windows(
    text: PretrainingText,
    tokenizer: PreTrainedTokenizerBase,
    *,
    context_length: int,
    stride: int | None = None,
    streaming: bool = False,
    num_proc: int | None = None,
    cache_dir: PathLike | None = None,
    windows_dir: PathLike | None = None,
) -> PretrainingData:
    """Training and validation windows of `text`, in all three split modes (see `read_pretraining_text`).

    The windows are tokenized once and saved (`saved_windows`) in a folder of `windows_dir`
    (default <cache_dir>/windows, or under datasets' cache) named by `text`'s content, the
    tokenizer, context length, stride and split; a later run with the same inputs, and every other
    process of this run, loads them from there. With `streaming` the training windows are an
    IterableDataset read while training, never saved, and the held-out ones are read into memory
    once (every process reads the whole stream for them; a --validation_file avoids that).
    """
    stride = stride or context_length
    build = partial(_pretraining_splits, text, tokenizer, context_length, stride, streaming, num_proc, cache_dir)
    if streaming:
        windows, origin = build(), "each process reads its share"
        if isinstance(windows["validation"], IterableDataset):
            windows["validation"] = Dataset.from_list(
                list(windows["validation"]), features=windows["validation"].features
            )
    else:
        root = Path(windows_dir or Path(cache_dir or datasets.config.HF_DATASETS_CACHE) / "windows")
        split = None if text.validation_identity else (text.validation_fraction, text.split_by)
        validation = text.validation_identity.content if text.validation_identity else None
        key = short_hash(
            text.content, validation, tokenizer_fingerprint(tokenizer), context_length, stride, split, PIPELINE_VERSION
        )
        windows, reused = saved_windows(root / key, build)
        origin = f"windows {'reused from' if reused else 'tokenized and saved to'} {root / key}"
    return PretrainingData(windows["train"], windows["validation"], text.validation_text, *text.descriptions, origin)


def _pretraining_splits(
    text: PretrainingText,
    tokenizer: PreTrainedTokenizerBase,
    context_length: int,
    stride: int,
    streaming: bool,
    num_proc: int | None,
    cache_dir: PathLike | None,
) -> dict[str, AnyDataset]:
    """{"train", "validation"} windows of `text`, tokenized now (the training ones streamed with `streaming`)."""
    common = dict(tokenizer=tokenizer, context_length=context_length, cache_dir=cache_dir, num_proc=num_proc)
    train = partial(build_lm_datasets, **common, stride=stride, streaming=streaming)
    if text.validation_text is None:  # held out of the token stream, or of the documents
        return train(
            text.train, validation_fraction=text.validation_fraction, split_by=text.split_by, identity=text.identity
        )
    validation = partial(build_lm_datasets, [text.validation_text], **common, validation_fraction=0)
    if text.validation_identity is not None:  # a --validation_file
        whole = train(text.train, validation_fraction=0, identity=text.identity)
        return {"train": whole["train"], "validation": validation()["train"]}
    parts = {}  # the first and the last characters of --train_file
    for split, build, part in (
        ("training", partial(train, text.train, validation_fraction=0), text.train[0]),
        ("validation", validation, text.validation_text),
    ):
        try:
            parts[split] = build()["train"]
        except DataError as error:
            raise DataError(
                f"--train_file {text.source}, its {split} part (--split_by characters, "
                f"--validation_fraction {text.validation_fraction}: {len(part):,} characters): {error}"
            ) from None
    return {"train": parts["training"], "validation": parts["validation"]}


# ----------------------------------------------------------------------------- helpers


def _hash_texts(texts: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8", errors="surrogatepass") if isinstance(text, str) else repr(text).encode()
        digest.update(len(data).to_bytes(8, "little"))  # length-prefixed: ["ab", "c"] ≠ ["a", "bc"]
        digest.update(data)
    return digest.hexdigest()


def _str(path: PathLike | None) -> str | None:
    return None if path is None else str(path)


@contextmanager
def _reraise_data_errors() -> Iterator[None]:
    """`datasets` wraps errors raised while generating a split; show ours as they are."""
    try:
        yield
    except DatasetGenerationError as error:
        if isinstance(error.__cause__, DataError):
            raise error.__cause__ from None
        raise
