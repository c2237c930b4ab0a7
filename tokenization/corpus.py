"""Where data comes from: one opener, with one set of rules and messages, for every consumer.

Tokenizer training (`train_bpe`), pretraining data (`training.data.windows.load_corpus`), evaluation
(`scripts/evaluate.py`) and labelled records (`read_records`: instruction and classification
data) all open what a user hands them with `open_source`, which accepts:

    EMBEDDED_CORPUS ("embedded:pydoc")     CPython's own documentation, one text per topic
    a path (str or os.PathLike) to
      .json .jsonl .csv .parquet .arrow    rows, read with `datasets`
      any other file                       one UTF-8 text
      a `save_to_disk` folder              its rows (the `split` of a DatasetDict)
      a folder holding only .txt files     those texts, in sorted order
      any other folder                     the data files `datasets.load_dataset` reads there
    a dataset name (no such path)          `datasets.load_dataset(name, split=split)`
    a list or tuple of os.PathLike         those UTF-8 text files, in order
    a datasets.Dataset / IterableDataset   its rows
    any other iterable of str              the texts themselves

and refuses, with a message naming the source and what to do: bytes, a DatasetDict, a str that
looks like text rather than a path, missing or unreadable files, and files that are not UTF-8
(policy: strict, no silent replacement; the message gives the byte offset and line).

Rows hold text in a column (`text_column`, checked by `check_text_column`); labelled records
are rows with more columns. Files are read by us, not by a library, so that a bad byte is
reported with its file, offset and line.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from modeling_minigpt.files import atomic_write_text

if TYPE_CHECKING:
    import datasets

PathLike = str | os.PathLike
# What `open_source` accepts (see the module docstring). `Union`, because `|` does not take the
# string forward references of `datasets`, which is imported only when a source needs it.
Source = Union[PathLike, Iterable[str | os.PathLike], "datasets.Dataset", "datasets.IterableDataset", "OpenedSource"]  # noqa: UP007

# Files are read in pieces of about this many characters (1 MiB of ASCII), so a 20 MB file
# never sits in memory as one string and the tokenizer can work on pieces in parallel.
FILE_CHUNK_CHARS = 1 << 20
# The default corpus when a user names none: CPython's own reference documentation, shipped as
# data with every Python (`pydoc_data.topics`, ~465k characters of human-written English). It is
# on every machine that has the package, so nothing is downloaded or copied into this repo.
EMBEDDED_CORPUS = "embedded:pydoc"
# Single files with these suffixes hold rows, read with `datasets`; any other file is text.
RECORD_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
# A str with a newline or longer than this is surely text, not a path or a dataset name.
_MAX_PATH_CHARS = 1024


# ----------------------------------------------------------------------------- errors


class DataError(ValueError):
    """Bad input data (a source, a record, a tokenizer, a saved folder), found before any training
    starts; the message names what is wrong and what to do."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A file or folder that does not exist (a `DataError` and a `FileNotFoundError`)."""


class DataPermissionError(DataError, PermissionError):
    """A file that cannot be read (a `DataError` and a `PermissionError`)."""


class DataTypeError(DataError, TypeError):
    """A source or an item of the wrong type (a `DataError` and a `TypeError`)."""


# ----------------------------------------------------------------------------- the embedded corpus


def embedded_documents() -> list[str]:
    """The embedded corpus as documents: one per pydoc topic, in a fixed (sorted) order."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def write_embedded_corpus(out_dir: PathLike, validation_every: int = 10) -> tuple[Path, Path]:
    """Write the embedded corpus as train.txt / validation.txt (every n-th topic held out).

    Whole documents go to one side or the other, so no validation text is ever trained on.
    """
    out_dir = Path(out_dir)
    documents = embedded_documents()
    held_out = [d for i, d in enumerate(documents) if i % validation_every == validation_every - 1]
    kept = [d for i, d in enumerate(documents) if i % validation_every != validation_every - 1]
    paths = out_dir / "train.txt", out_dir / "validation.txt"
    for path, docs in zip(paths, (kept, held_out), strict=True):
        atomic_write_text(path, "\n\n".join(docs))
    return paths


# ----------------------------------------------------------------------------- opening a source


@dataclass(frozen=True)
class OpenedSource:
    """What a source turned out to be: text files, rows, or texts (exactly one is set)."""

    files: tuple[Path, ...] = ()  # UTF-8 text files, checked to exist and be readable
    dataset: Any = None  # a datasets.Dataset or IterableDataset of rows
    texts: Iterable[Any] | None = None  # the texts themselves (each checked when read)


def open_source(
    source: Source,
    *,
    split: str = "train",
    streaming: bool = False,
    cache_dir: PathLike | None = None,
    what: str = "corpus file",
) -> OpenedSource:
    """`source` opened by the rules of the module docstring; files are checked, nothing is read yet.

    `split` picks the split of a dataset folder or name; with `streaming`, rows read with
    `datasets` come as an IterableDataset. `what` names the source in messages (e.g. the flag
    that gave it: "--train_file"). An `OpenedSource` is returned as it is.
    """
    if isinstance(source, OpenedSource):
        return source
    if isinstance(source, str) and source == EMBEDDED_CORPUS:
        return OpenedSource(texts=embedded_documents())
    if isinstance(source, str) and ("\n" in source or len(source) > _MAX_PATH_CHARS):
        raise DataError(
            f"a single str is read as a path or a dataset name, and this one looks like text ({len(source)} "
            "characters): pass texts as a list, e.g. train_bpe([text], ...) or load_corpus([text])"
        )
    if isinstance(source, (str, os.PathLike)):
        return _open_path(Path(source), split, streaming, cache_dir, what)
    if isinstance(source, (bytes, bytearray)):
        raise DataTypeError("a source cannot be bytes: decode it to str (UTF-8) first, or pass the file path")
    if _is_dataset_dict(source):
        raise DataTypeError(f"got a DatasetDict with splits {list(source)}: pass one split, e.g. dataset['train']")
    if _is_dataset(source):
        return OpenedSource(dataset=source)
    if isinstance(source, (list, tuple)) and source and all(isinstance(item, os.PathLike) for item in source):
        # All files are checked before any is read, so a typo fails at once.
        return OpenedSource(files=tuple(check_file(Path(item), what) for item in source))
    return OpenedSource(texts=source)


def _open_path(path: Path, split: str, streaming: bool, cache_dir: PathLike | None, what: str) -> OpenedSource:
    if path.is_file():
        builder = RECORD_FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            return OpenedSource(files=(check_file(path, what),))
        if path.suffix.lower() in _LOCATED_RECORD_FILES:  # `datasets` reads bad bytes and fails later, unlocated
            check_utf8(path)
        return OpenedSource(dataset=_load_dataset(builder, split, streaming, cache_dir, data_files=str(path)))
    if path.is_dir():
        return _open_folder(path, split, streaming, cache_dir, what)
    if path.suffix in (".txt", *RECORD_FILE_BUILDERS) or path.is_absolute() or str(path).startswith((".", "~")):
        raise DataFileNotFoundError(f"{what} {path} does not exist (no such file or folder)")  # surely a path
    return OpenedSource(dataset=_load_dataset(str(path), split, streaming, cache_dir))


def _open_folder(path: Path, split: str, streaming: bool, cache_dir: PathLike | None, what: str) -> OpenedSource:
    import datasets

    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():  # written by save_to_disk
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"{path} holds the splits {list(loaded)} but no {split!r} split")
            loaded = loaded[split]
        return OpenedSource(dataset=loaded.to_iterable_dataset() if streaming else loaded)
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    if files and all(p.suffix == ".txt" for p in files):
        return OpenedSource(files=tuple(check_file(p, what) for p in files))
    others = [p for p in files if p.suffix != ".txt"]
    if len(others) < len(files):  # `datasets` would read one kind of file and skip the other without a word
        shown = ", ".join(str(p.relative_to(path)) for p in others[:3]) + (", ..." if len(others) > 3 else "")
        raise DataError(
            f"{what} {path} mixes .txt files with {len(others)} other file(s) ({shown}): give a folder of .txt files "
            "only (decompress .gz files first), or of data files of one format"
        )
    try:
        return OpenedSource(
            dataset=datasets.load_dataset(str(path), split=split, streaming=streaming, cache_dir=_str(cache_dir))
        )
    except Exception as error:  # no data files, unknown format, bad split: one message
        raise DataError(
            f"{what} {path} is not a regular file, and as a folder it is neither a save_to_disk folder, nor a "
            f"folder of .txt files, nor data files `datasets` can load ({split=}): {error}"
        ) from error


def _load_dataset(name: str, split: str, streaming: bool, cache_dir: PathLike | None, **kwargs: Any) -> Any:
    import datasets

    what = kwargs.get("data_files", name)
    try:
        return datasets.load_dataset(name, split=split, streaming=streaming, cache_dir=_str(cache_dir), **kwargs)
    except Exception as error:  # missing path, unknown name, offline Hub, bad split: one message
        if isinstance(what, str) and what.lower().endswith(".jsonl") and Path(what).is_file():
            read_records(Path(what))  # names the file and the line of the first bad record, if that is the cause
        raise DataError(
            f"{what!r} is neither an existing text file/folder nor a dataset `datasets` can load ({split=}): {error}"
        ) from error


def check_file(path: Path, what: str = "corpus file") -> Path:
    """`path` if it is a readable regular file; a DataError naming it (and `what` it is) otherwise."""
    if not path.exists():
        raise DataFileNotFoundError(f"{what} {path} does not exist (no such file or folder)")
    if not path.is_file():
        raise DataError(f"{what} {path} is not a regular file (a folder?)")
    if not os.access(path, os.R_OK):
        raise DataPermissionError(f"{what} {path} is not readable (permissions)")
    return path


def _is_dataset(source: object) -> bool:
    # A source can only be a Dataset if `datasets` was imported: do not import it to find out.
    datasets = sys.modules.get("datasets")
    return datasets is not None and isinstance(source, (datasets.Dataset, datasets.IterableDataset))


def _is_dataset_dict(source: object) -> bool:
    datasets = sys.modules.get("datasets")
    return datasets is not None and isinstance(source, (datasets.DatasetDict, datasets.IterableDatasetDict))


def _str(path: PathLike | None) -> str | None:
    return None if path is None else str(path)


def describe_source(source: Source) -> str:
    """A few words naming a source, for messages."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, OpenedSource):
        return describe_source(
            source.files if source.files else source.texts if source.dataset is None else source.dataset
        )
    if isinstance(source, (list, tuple)) and source and isinstance(source[0], os.PathLike):
        return describe_files(source)
    if _is_dataset(source):
        return f"(a {type(source).__name__})"
    return f"({len(source)} texts)" if isinstance(source, (list, tuple)) else "(the texts)"


def describe_files(paths: Sequence[Any]) -> str:
    return str(paths[0]) if len(paths) == 1 else f"of {len(paths)} files ({paths[0]}, ...)"


# ----------------------------------------------------------------------------- reading texts


def check_text_column(dataset: Any, text_column: str) -> None:
    """Refuse a dataset without `text_column`, or whose `text_column` does not hold strings."""
    names = dataset.column_names
    if names is not None and text_column not in names:
        raise DataError(f"text_column={text_column!r} is not a column of the dataset; its columns are {names}")
    feature = (dataset.features or {}).get(text_column)
    if feature is not None and getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise DataTypeError(f"column {text_column!r} holds {feature}, not text")


def iter_column(dataset: Any, column: str) -> Iterator[Any]:
    """The values of one column, in order, read in batches."""
    for batch in dataset.iter(batch_size=1000):
        yield from batch[column]


def checked_texts(texts: Iterable[Any], where: str, item: str = "item") -> Iterator[str]:
    """`texts`, refusing (as DataTypeError) the first one that is not a str, e.g. "item 3 of the source"."""
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise DataTypeError(f"{item} {index} of {where} is a {type(text).__name__}, not a str: {text!r:.80}")
        yield text


def iter_texts(source: Source, text_column: str = "text") -> tuple[Iterator[str], int | None]:
    """(texts, number of texts if known) of any source: a file is its text in pieces (see
    `read_utf8_chunks`), a row its `text_column`."""
    opened = open_source(source)
    if opened.files:
        return (piece for path in opened.files for piece in read_utf8_chunks(path)), None
    if opened.dataset is not None:
        check_text_column(opened.dataset, text_column)
        texts = checked_texts(iter_column(opened.dataset, text_column), f"dataset column {text_column!r}")
        return texts, _dataset_length(opened.dataset)
    if isinstance(opened.texts, (list, tuple)):
        return checked_texts(opened.texts, "the source"), len(opened.texts)
    return checked_texts(opened.texts, "the source"), None


def _dataset_length(dataset: Any) -> int | None:
    try:
        return len(dataset)
    except TypeError:  # IterableDataset has no length
        return None


def read_text(source: Source, what: str = "corpus file") -> str:
    """The whole text of a single text file (or of the embedded corpus), with newlines normalised
    to "\\n" as Python's text mode reads them."""
    if isinstance(source, str) and source == EMBEDDED_CORPUS:
        return "\n\n".join(embedded_documents())
    opened = open_source(source, what=what)
    if len(opened.files) != 1:
        raise DataError(f"{what} {source} is not a single text file, and it is read here as one text")
    text = "".join(read_utf8_chunks(opened.files[0]))
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_utf8_chunks(path: Path, chunk_chars: int = FILE_CHUNK_CHARS) -> Iterator[str]:
    """The file's text in pieces of about `chunk_chars`, cut only where a cut cannot change
    GPT-2 pre-tokenization: before a line that starts with a letter or digit, when the line
    before ends with one. A newline between two non-space characters is always a pre-token of
    its own, so training on the pieces counts exactly the words of the whole file.

    Raises DataError naming the file, byte offset and line of the first byte that is not UTF-8.
    """
    pieces: list[str] = []
    size = 0
    offset = 0
    previous = ""
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(_not_utf8(path, error, offset, line_number)) from None
            offset += len(raw)
            if size >= chunk_chars and _safe_cut(previous, line):
                yield "".join(pieces)
                pieces, size = [], 0
            pieces.append(line)
            size += len(line)
            previous = line
    if pieces:
        yield "".join(pieces)


def check_utf8(path: Path) -> None:
    """DataError naming the file, byte offset and line of the first byte of `path` that is not UTF-8. Reads it once."""
    offset = 0
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(_not_utf8(path, error, offset, line_number)) from None
            offset += len(raw)


def read_utf8(path: Path, error: type[ValueError] = DataError) -> str:
    """The whole file as text; `error` naming the file, line and byte offset of the first byte that is not UTF-8."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as problem:
        raise error(_not_utf8(path, problem, 0, data.count(b"\n", 0, problem.start) + 1)) from None


def _not_utf8(path: Path, error: UnicodeDecodeError, offset: int, line_number: int) -> str:
    """The message for `error`, raised decoding bytes that start at byte `offset` of `path`, on line `line_number`."""
    return (
        f"{path}: not valid UTF-8 at byte offset {offset + error.start} (line {line_number}): "
        f"{error.reason} ({error.object[error.start : error.end]!r}). Text files must be UTF-8; "
        "re-encode it, e.g. `iconv -f latin1 -t utf-8`."
    )


def _safe_cut(previous_line: str, line: str) -> bool:
    return (
        len(previous_line) >= 2 and previous_line.endswith("\n") and previous_line[-2].isalnum() and line[:1].isalnum()
    )


# ----------------------------------------------------------------------------- reading records


# Record files read here rather than with `datasets`, so a bad record is named by file, index and line.
_LOCATED_RECORD_FILES = (".json", ".jsonl", ".csv")


def read_records(source: Any, error: type[ValueError] = DataError, split: str = "train") -> list[tuple[str, Any]]:
    """(location, record) pairs of labelled data; `location` names the file and record for
    messages, e.g. "data.jsonl record 3 (line 5)".

    A .json (array), .jsonl or .csv file is read here, record by record; a list of dicts is taken
    as it is; anything else `open_source` accepts must open as rows. Every problem raises
    `error` with its location.
    """
    if isinstance(source, Sequence) and not isinstance(source, (str, bytes)):
        return [(f"record {i}", row) for i, row in enumerate(source)]
    try:
        if isinstance(source, (str, os.PathLike)) and Path(source).suffix.lower() in _LOCATED_RECORD_FILES:
            return _read_record_file(check_file(Path(source), "data file"), error)
        opened = open_source(source, split=split, what="data file")
    except DataError as problem:
        raise error(str(problem)) from None
    if opened.dataset is None and isinstance(source, (str, os.PathLike)):
        raise error(
            f"{Path(source).name}: unsupported file type {Path(source).suffix.lower()!r}; use .json (an array), "
            ".jsonl, .csv, .parquet, .arrow, a save_to_disk folder or a dataset name"
        )
    if opened.dataset is None:
        raise error(
            f"cannot read records from {type(source).__name__}: pass a path, a datasets.Dataset or a list of dicts"
        )
    return [(f"dataset record {i}", row) for i, row in enumerate(opened.dataset.to_list())]


def _read_record_file(path: Path, error: type[ValueError]) -> list[tuple[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            data = json.loads(read_utf8(path, error))
        except json.JSONDecodeError as e:
            raise error(f"{path.name} line {e.lineno}: invalid JSON: {e.msg}") from None
        if not isinstance(data, list):
            raise error(f"{path.name}: expected a JSON array of records, got a JSON {type(data).__name__}")
        return [(f"{path.name} record {i}", row) for i, row in enumerate(data)]
    if suffix == ".jsonl":
        records = []
        with io.StringIO(read_utf8(path, error), newline=None) as f:  # newlines as a file opened as text
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path.name} record {len(records)} (line {line_no})"
                try:
                    records.append((where, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise error(f"{where}: invalid JSON: {e.msg}") from None
        return records
    with io.StringIO(read_utf8(path, error), newline="") as f:
        reader = csv.DictReader(f)
        # line_num is read after each row so quoted multi-line fields still point at the row's end.
        return [(f"{path.name} record {i} (line {reader.line_num})", row) for i, row in enumerate(reader)]


# ----------------------------------------------------------------------------- watching a stream


@dataclass
class CorpusMonitor:
    """Watches the texts stream past the trainer: how much there was, whether any of it is
    more than whitespace, and a sample (the first `head_chars` plus a reservoir of later texts)
    for the round-trip check after training."""

    head_chars: int = 100_000
    reservoir_size: int = 16
    max_sample_chars: int = 20_000
    seed: int = 0
    n_texts: int = 0
    n_chars: int = 0
    has_content: bool = False
    head: list[str] = field(default_factory=list)
    reservoir: list[str] = field(default_factory=list)
    _head_size: int = 0

    def watch(self, texts: Iterable[str]) -> Iterator[str]:
        rng = random.Random(self.seed)
        for text in texts:
            self._record(text, rng)
            yield text

    def _record(self, text: str, rng: random.Random) -> None:
        self.n_texts += 1
        self.n_chars += len(text)
        self.has_content = self.has_content or (bool(text) and not text.isspace())
        if self._head_size < self.head_chars:
            piece = text[: self.head_chars - self._head_size]
            self.head.append(piece)
            self._head_size += len(piece)
            return
        # Reservoir sampling (Algorithm R) over the texts after the head.
        seen = self.n_texts - len(self.head)
        if len(self.reservoir) < self.reservoir_size:
            self.reservoir.append(text[: self.max_sample_chars])
        elif (slot := rng.randrange(seen)) < self.reservoir_size:
            self.reservoir[slot] = text[: self.max_sample_chars]

    @property
    def sample(self) -> list[str]:
        return [text for text in self.head + self.reservoir if text]
