"""Pretraining data: text → documents → token pieces → sliding windows, cached by `datasets`.

Each stage is a `datasets` object, so processed data is cached on disk under a fingerprint and a
second run reads it back instead of re-tokenizing:

    load_corpus          files / a datasets dataset (+ text column) / texts
                         → documents: rows `text`, `doc_id`, `doc_end`
    tokenize_documents   → pieces of ids: rows `input_ids`, `doc_id`; `<|endoftext|>` after
                           each document, so the documents form one flat token stream
    window_dataset       → windows: rows `input_ids` (context_length + 1 tokens), `doc_id`,
                           `offset` (where in its document the window starts)
    build_lm_datasets    all of the above, plus the checks and a train/validation split
    collate_windows      a batch of windows → {"input_ids": [B, T], "shift_labels": [B, T]}

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

Caching: sources get a fingerprint (files: path, size and mtime; texts: a hash of the text;
datasets: their own fingerprint), each stage adds its parameters and the tokenizer's hash, and
`datasets` stores every stage as Arrow files under `cache_dir`. Writes go to temporary files
renamed on success, so a failed run leaves no half-written cache. Bump `PIPELINE_VERSION` when
a change alters the output of a stage.
"""

from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Mapping, Sequence, Union

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets import Dataset, DatasetDict, Features, IterableDataset, IterableDatasetDict, List, Value
from datasets.exceptions import DatasetGenerationError
from transformers import PreTrainedTokenizerBase

from tokenization import EOS_TOKEN, encode_batch_fast
from tokenization.corpus import EMBEDDED_CORPUS, embedded_documents, read_utf8_chunks

PathLike = Union[str, os.PathLike]
CorpusSource = Union[PathLike, Sequence[PathLike], Iterable[str], Dataset, IterableDataset]
AnyDataset = Union[Dataset, IterableDataset]

# Part of every cache fingerprint: bump it when a change alters what a stage produces.
PIPELINE_VERSION = "data-v1"
# 64 K characters (~16 K tokens) per piece: small enough that a 20 MB file gives a few hundred
# pieces to tokenize in parallel, large enough that per-call overhead is negligible.
PIECE_CHARS = 1 << 16
# Each block yields about this many window tokens (4 MB of int32), whatever the stride.
BLOCK_WINDOW_TOKENS = 1 << 20
# Single files with these suffixes hold records (read with `datasets`), not plain text.
_RECORD_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}

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


class DataError(ValueError):
    """Bad training data or tokenizer, found before any training starts."""


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


def resolve_tokenizer(tokenizer: PreTrainedTokenizerBase | PathLike | None) -> PreTrainedTokenizerBase:
    """The tokenizer itself, or the one saved in folder `tokenizer`; a clear error if missing."""
    if tokenizer is None:
        raise DataError(
            "no tokenizer given: pass the tokenizer the model uses (a saved tokenizer folder, or one from "
            "tokenization.train_bpe / tokenization.load_gpt2_tokenizer)"
        )
    if not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    path = Path(tokenizer)
    if not (path / "tokenizer.json").is_file():
        raise DataError(f"no tokenizer at {path}: expected a folder with tokenizer.json (from save_pretrained)")
    from transformers import AutoTokenizer

    import modeling_minigpt  # noqa: F401  registers "minigpt": a model folder's config then needs no remote code

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as error:  # any loading failure becomes one clear message
        raise DataError(f"could not load the tokenizer saved in {path}: {error}") from error


def check_tokenizer(tokenizer: PreTrainedTokenizerBase | None, vocab_size: int | None = None) -> int:
    """Refuse a tokenizer the pipeline or the model cannot use; return the `<|endoftext|>` id.

    - it must be a fast tokenizer (the batched Rust encoder does the work);
    - its eos token must be `<|endoftext|>`, the document separator;
    - if `vocab_size` (the model's) is given, the tokenizer must have exactly that many ids:
      more would index past the embedding, fewer means a different tokenizer than the model's.
    """
    tokenizer = resolve_tokenizer(tokenizer)
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise DataError(f"{type(tokenizer).__name__} is not a fast tokenizer: use a PreTrainedTokenizerFast")
    if tokenizer.eos_token != EOS_TOKEN or tokenizer.eos_token_id is None:
        raise DataError(
            f"the tokenizer's eos token is {tokenizer.eos_token!r}, but documents are joined with {EOS_TOKEN!r}: "
            "use a tokenizer whose eos token is <|endoftext|> (tokenization.train_bpe and the GPT-2 tokenizer are)"
        )
    if vocab_size is not None and len(tokenizer) != vocab_size:
        raise DataError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab_size}: "
            "train or load the model with this tokenizer's size, or use the tokenizer it was trained with"
        )
    return tokenizer.eos_token_id


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Hash of everything that decides the ids: the backend's full JSON (vocab, merges, ...)."""
    return _hash(tokenizer.backend_tokenizer.to_str(), tokenizer.eos_token_id)


# ----------------------------------------------------------------------------- corpus → documents


def load_corpus(
    source: CorpusSource,
    *,
    text_column: str = "text",
    split: str = "train",
    doc_separator: str | None = None,
    streaming: bool = False,
    cache_dir: PathLike | None = None,
    chunk_chars: int = PIECE_CHARS,
) -> AnyDataset:
    """Documents of `source` as rows `text`, `doc_id`, `doc_end` (last piece of its document).

    `source` is one of:
      - `EMBEDDED_CORPUS` ("embedded:pydoc"): CPython's documentation, one document per topic;
      - a text file, a folder of `*.txt` files (sorted), or a list of text files: each file is
        one document, or several if `doc_separator` is given (then each document is held in
        memory whole); files must be UTF-8;
      - a `.json/.jsonl/.csv/.parquet` file, a folder `datasets` can load or `save_to_disk`
        wrote, or a dataset name (`split` of it): each row of `text_column` is a document;
      - a `datasets.Dataset` / `IterableDataset` (its `text_column`);
      - any other iterable of str: each is a document (listed in memory unless streaming; with
        streaming a one-shot iterator can be iterated only once).
    With `streaming=True` nothing is read until iterated (an `IterableDataset`); otherwise the
    documents are written once to Arrow files under `cache_dir` (default: datasets' cache).
    """
    if source == EMBEDDED_CORPUS:
        source = embedded_documents()
    if isinstance(source, (str, os.PathLike)):
        source = _open_path_source(Path(source), split, streaming, cache_dir)
    if isinstance(source, (DatasetDict, IterableDatasetDict)):
        raise DataError(f"got a dataset with splits {list(source)}: pass one split, e.g. dataset['train']")

    if isinstance(source, (list, tuple)) and source and all(isinstance(s, os.PathLike) for s in source):
        files = _check_files([Path(s) for s in source])
        generator = _file_documents
        gen_kwargs = {"paths": tuple(map(str, files)), "doc_separator": doc_separator, "chunk_chars": chunk_chars}
        # Like make: a file whose size and modification time are unchanged is not read again.
        stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
        fingerprint = _hash("files", stats, doc_separator, chunk_chars)
    elif isinstance(source, Dataset):
        _check_text_column(source, text_column)
        generator, gen_kwargs = _dataset_documents, {"dataset": source, "text_column": text_column}
        fingerprint = _hash("dataset", source._fingerprint, text_column)
    elif isinstance(source, IterableDataset) and streaming:
        _check_text_column(source, text_column)
        generator, gen_kwargs, fingerprint = _dataset_documents, {"dataset": source, "text_column": text_column}, None
    elif isinstance(source, (bytes, bytearray)):
        raise DataError("a corpus cannot be bytes: decode it to str (UTF-8) first, or pass the file path")
    else:
        texts = source if not isinstance(source, IterableDataset) else _iter_column(source, text_column)
        if not streaming or isinstance(texts, list):
            texts = tuple(texts)  # read once, to hash it; a tuple, because datasets shards list arguments
        fingerprint = None if streaming else _hash("texts", _hash_texts(texts))
        generator, gen_kwargs = _text_documents, {"texts": texts, "where": "the texts"}

    if streaming:
        return IterableDataset.from_generator(generator, features=DOCUMENT_FEATURES, gen_kwargs=gen_kwargs)
    with _reraise_data_errors():
        return Dataset.from_generator(
            generator,
            features=DOCUMENT_FEATURES,
            gen_kwargs=gen_kwargs,
            cache_dir=_str(cache_dir),
            fingerprint=_hash(fingerprint, PIPELINE_VERSION),
        )


def _open_path_source(path: Path, split: str, streaming: bool, cache_dir: PathLike | None) -> CorpusSource:
    """Text files as Paths; anything `datasets` reads as a (Iterable)Dataset."""
    if path.is_file():
        builder = _RECORD_FILE_BUILDERS.get(path.suffix.lower())
        return _load_dataset(builder, split, streaming, cache_dir, data_files=str(path)) if builder else [path]
    if path.is_dir():
        if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
            loaded = datasets.load_from_disk(str(path))
            loaded = loaded[split] if isinstance(loaded, DatasetDict) else loaded
            return loaded.to_iterable_dataset() if streaming else loaded
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        if files and all(p.suffix == ".txt" for p in files):
            return files
        return _load_dataset(str(path), split, streaming, cache_dir)
    if "\n" in str(path) or len(str(path)) > 1024:
        raise DataError("a str source is a path or a dataset name, and this one looks like text: pass texts as a list")
    if path.suffix in (".txt", *_RECORD_FILE_BUILDERS) or path.is_absolute() or str(path).startswith((".", "~")):
        raise DataError(f"corpus file {path} does not exist")  # surely meant as a path, not a dataset name
    return _load_dataset(str(path), split, streaming, cache_dir)


def _load_dataset(name: str, split: str, streaming: bool, cache_dir: PathLike | None, **kwargs: Any) -> AnyDataset:
    what = kwargs.get("data_files", name)
    try:
        return datasets.load_dataset(name, split=split, streaming=streaming, cache_dir=_str(cache_dir), **kwargs)
    except Exception as error:  # missing path, unknown name, offline Hub, bad split: one message
        raise DataError(
            f"{what!r} is neither an existing text file/folder nor a dataset `datasets` can load ({split=}): {error}"
        ) from error


def _check_files(paths: list[Path]) -> list[Path]:
    # All files are checked before any is read, so a typo fails at once.
    for path in paths:
        if not path.is_file():
            raise DataError(f"corpus file {path} does not exist or is not a regular file")
        if not os.access(path, os.R_OK):
            raise DataError(f"corpus file {path} is not readable (permissions)")
    return paths


def _check_text_column(dataset: AnyDataset, text_column: str) -> None:
    names = dataset.column_names
    if names is not None and text_column not in names:
        raise DataError(f"text_column={text_column!r} is not a column of the dataset; its columns are {names}")
    feature = (dataset.features or {}).get(text_column)
    if feature is not None and getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise DataError(f"column {text_column!r} holds {feature}, not text")


def _iter_column(dataset: AnyDataset, column: str) -> Iterator[Any]:
    for batch in dataset.iter(batch_size=1000):
        yield from batch[column]


def _file_documents(paths: tuple[str, ...], doc_separator: str | None, chunk_chars: int) -> Iterator[dict[str, Any]]:
    doc_id, n_documents = 0, 0
    for path in paths:
        pieces = _utf8_pieces(Path(path), chunk_chars)
        documents = [pieces] if doc_separator is None else ([text] for text in _split_text(pieces, doc_separator))
        for document in documents:
            emitted = False
            for row in _document_rows(document, doc_id):
                emitted = True
                yield row
            n_documents += emitted
            doc_id += 1
    if n_documents == 0:
        raise DataError(f"the corpus {_describe_files(paths)} is empty or whitespace-only: no document has any text")


def _utf8_pieces(path: Path, chunk_chars: int) -> Iterator[str]:
    pieces = read_utf8_chunks(path, chunk_chars)
    while True:
        try:
            piece = next(pieces)
        except StopIteration:
            return
        except ValueError as error:  # not UTF-8: the message names the file, byte offset and line
            raise DataError(str(error)) from None
        yield piece


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
    yield from _text_documents(_iter_column(dataset, text_column), where=f"column {text_column!r}")


def _text_documents(texts: Iterable[Any], where: str) -> Iterator[dict[str, Any]]:
    n_documents = 0
    for doc_id, text in enumerate(texts):
        if not isinstance(text, str):
            raise DataError(f"document {doc_id} of {where} is a {type(text).__name__}, not a str: {text!r:.80}")
        if text and not text.isspace():
            n_documents += 1
            yield {"text": text, "doc_id": doc_id, "doc_end": True}
    if n_documents == 0:
        raise DataError(f"the corpus ({where}) is empty or whitespace-only: no document has any text")


def _describe_files(paths: Sequence[Any]) -> str:
    return str(paths[0]) if len(paths) == 1 else f"of {len(paths)} files ({paths[0]}, ...)"


def _describe(source: CorpusSource) -> str:
    """A few words naming a source, for messages."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, (list, tuple)) and source and isinstance(source[0], os.PathLike):
        return _describe_files(source)
    if isinstance(source, (Dataset, IterableDataset)):
        return f"(a {type(source).__name__})"
    return f"({len(source)} texts)" if isinstance(source, (list, tuple)) else "(the texts)"


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
    `num_proc` > 1 also splits the dataset across processes (not in streaming mode).
    """
    tokenizer = resolve_tokenizer(tokenizer)
    eos_id = check_tokenizer(tokenizer)
    kwargs: dict[str, Any] = dict(
        batched=True,
        batch_size=batch_size,
        remove_columns=["text", "doc_end"],
        features=TOKEN_FEATURES,
        fn_kwargs={"tokenizer": tokenizer, "eos_id": eos_id},
    )
    if isinstance(documents, IterableDataset):
        return documents.with_format("arrow").map(_tokenize_batch, **kwargs).with_format(None)
    fingerprint = _hash(documents._fingerprint, tokenizer_fingerprint(tokenizer), "tokenize", PIPELINE_VERSION)
    tokens = documents.with_format("arrow").map(
        _tokenize_batch, **kwargs, num_proc=num_proc, new_fingerprint=fingerprint, writer_batch_size=256, desc="Tokenizing"
    )
    return tokens.with_format(None)


def _tokenize_batch(pieces: pa.Table, tokenizer: PreTrainedTokenizerBase, eos_id: int) -> pa.Table:
    """The datasets.map(batched=True) step: ids of each piece, `<|endoftext|>` after a document's
    last piece. Arrow in and out: `datasets` would otherwise walk every id in Python."""
    ids = encode_batch_fast(tokenizer, pieces.column("text").to_pylist())
    doc_ends = pieces.column("doc_end").to_pylist()
    ids = [[*piece, eos_id] if doc_end else piece for piece, doc_end in zip(ids, doc_ends)]
    return pa.table({"input_ids": pa.array(ids, pa.list_(pa.int32())), "doc_id": pieces.column("doc_id")})


def count_tokens(tokens: Dataset) -> int:
    """Length of the token stream of a (non-streaming) token dataset."""
    lengths = pc.list_value_length(tokens.with_format("arrow")[:]["input_ids"])
    return int(pc.sum(lengths).as_py() or 0)


# ----------------------------------------------------------------------------- validation split


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
            kwargs["new_fingerprint"] = _hash(tokens._fingerprint, "split", fraction, validation, PIPELINE_VERSION)
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
    fingerprint = _hash(
        tokens._fingerprint, "blocks", context_length, stride, windows_per_block, token_range, PIPELINE_VERSION
    )
    with _reraise_data_errors():
        blocks = Dataset.from_generator(_token_blocks, gen_kwargs=gen_kwargs, cache_dir=_str(cache_dir), fingerprint=fingerprint)
    windows = blocks.with_format("arrow").map(
        _windows_of_blocks, **map_kwargs, new_fingerprint=_hash(fingerprint, "windows"), desc="Cutting windows"
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
    windows, doc_id, offset = (np.concatenate(column) for column in zip(*parts))  # every block has a window
    return pa.table(
        {
            "input_ids": pa.FixedSizeListArray.from_arrays(pa.array(windows.reshape(-1), pa.int32()), context_length + 1),
            "doc_id": pa.array(doc_id, pa.int64()),
            "offset": pa.array(offset, pa.int64()),
        }
    )


# ----------------------------------------------------------------------------- everything together


def build_lm_datasets(
    source: CorpusSource,
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
        num_proc: processes for tokenization (not used when streaming).
        cache_dir: where `datasets` keeps the processed stages (default: its own cache).
        vocab_size: the model's vocabulary size, checked against the tokenizer.

    Raises DataError, before anything is trained (and for streaming, after reading just enough
    to produce the first window of each split), for: an empty or whitespace-only corpus, one
    shorter than a window, non-UTF-8 files, a missing text column, a missing tokenizer or one
    whose eos or vocabulary size does not fit. With streaming, a bad byte further into a file
    is only met when it is read; the error still names the file and offset.
    """
    tokenizer = resolve_tokenizer(tokenizer)
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
        source, text_column=text_column, doc_separator=doc_separator, streaming=streaming, cache_dir=cache_dir
    )
    tokens = tokenize_documents(documents, tokenizer, num_proc=num_proc)
    corpus = f"the corpus {_describe(source)}"
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
            "train": window_dataset(tokens, **window, token_range=(0, cut), name=f"the training range (first {cut} tokens)"),
            "validation": window_dataset(
                tokens, **window, token_range=(cut, n_tokens), name=f"the validation range (last {n_tokens - cut} tokens)"
            ),
        }
    if streaming:
        for windows in splits.values():  # read up to the first window: fails now, not mid-training
            next(iter(windows))
        return IterableDatasetDict(splits)
    return DatasetDict(splits)


def collate_windows(batch: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """Windows of T + 1 tokens → {"input_ids": [B, T], "shift_labels": [B, T]} (int64).

    shift_labels[:, t] is the target of input_ids[:, t] (the next token), the aligned-labels
    convention of transformers' `ForCausalLMLoss`: all T positions are scored.
    """
    windows = torch.stack([torch.as_tensor(example["input_ids"], dtype=torch.long) for example in batch])  # (B, T + 1)
    # contiguous: the loss flattens shift_labels with .view(-1)
    return {"input_ids": windows[:, :-1].contiguous(), "shift_labels": windows[:, 1:].contiguous()}


# ----------------------------------------------------------------------------- helpers


def _hash(*parts: Any) -> str:
    """A stable 16-hex-digit fingerprint (datasets' length) of reprs of `parts`."""
    return hashlib.sha256(repr(parts).encode("utf-8")).hexdigest()[:16]


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
