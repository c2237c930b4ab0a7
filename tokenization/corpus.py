"""Turn what a user hands `train_bpe` (files, strings, a datasets column) into a stream of texts.

Files are read by us, not by tokenizers, so that bad input fails with a message naming the file:
missing, a directory, unreadable, or not UTF-8 (policy: strict, no silent replacement; the
error gives the byte offset and line so the file can be fixed or re-encoded).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Union

if TYPE_CHECKING:
    import datasets

PathLike = Union[str, os.PathLike]
Source = Union[PathLike, Iterable[Union[str, os.PathLike]], "datasets.Dataset", "datasets.IterableDataset"]

# Files are fed to the trainer in pieces of about this many characters (1 MiB of ASCII), so a
# 20 MB file never sits in memory as one string and the trainer can count pieces in parallel.
FILE_CHUNK_CHARS = 1 << 20
# The default corpus when a user names none: CPython's own reference documentation, shipped as
# data with every Python (`pydoc_data.topics`, ~465k characters of human-written English). It is
# on every machine that has the package, so nothing is downloaded or copied into this repo.
EMBEDDED_CORPUS = "embedded:pydoc"


def embedded_documents() -> list[str]:
    """The embedded corpus as documents: one per pydoc topic, in a fixed (sorted) order."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def write_embedded_corpus(out_dir: PathLike, validation_every: int = 10) -> tuple[Path, Path]:
    """Write the embedded corpus as train.txt / validation.txt (every n-th topic held out).

    Whole documents go to one side or the other, so no validation text is ever trained on.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    documents = embedded_documents()
    held_out = [d for i, d in enumerate(documents) if i % validation_every == validation_every - 1]
    kept = [d for i, d in enumerate(documents) if i % validation_every != validation_every - 1]
    paths = out_dir / "train.txt", out_dir / "validation.txt"
    for path, docs in zip(paths, (kept, held_out)):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("\n\n".join(docs), encoding="utf-8")
        os.replace(tmp, path)
    return paths


# A single str longer than this, or with a newline, is surely text, not a file name.
_MAX_PATH_CHARS = 4096


def iter_texts(source: Source, text_column: str = "text") -> tuple[Iterator[str], int | None]:
    """(texts, number of texts if known) for any accepted source.

    - `EMBEDDED_CORPUS` ("embedded:pydoc"): the documentation that ships with CPython;
    - a `str` or `os.PathLike`: one UTF-8 text file;
    - an iterable of `os.PathLike` (e.g. `Path`): those files, in order;
    - an iterable of `str`: the texts themselves (documents, lines, ...);
    - a `datasets.Dataset` / `IterableDataset`: the `text_column` column.
    Files are all checked (exist, readable) before any is read, so a typo fails at once.
    """
    if _is_dataset(source):
        return _iter_dataset_column(source, text_column), _dataset_length(source)
    if source == EMBEDDED_CORPUS:
        documents = embedded_documents()
        return iter(documents), len(documents)
    if isinstance(source, str):
        if "\n" in source or len(source) > _MAX_PATH_CHARS:
            raise ValueError(
                "a single str is read as a file path, and this one looks like text "
                f"({len(source)} characters); to train on a text pass a list: train_bpe([text], ...)"
            )
        return _iter_files([_checked_file(source)]), None
    if isinstance(source, os.PathLike):
        return _iter_files([_checked_file(source)]), None
    if isinstance(source, bytes):
        raise TypeError("bytes are not accepted as a source: decode them to str (UTF-8) first")
    items = list(source) if isinstance(source, (list, tuple)) else None
    if items is not None and items and all(isinstance(item, os.PathLike) for item in items):
        return _iter_files([_checked_file(item) for item in items]), None
    if items is not None:
        return _iter_strings(items), len(items)
    return _iter_strings(source), None


def _is_dataset(source: object) -> bool:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        return False
    if isinstance(source, datasets.DatasetDict):
        raise TypeError(f"got a DatasetDict with splits {list(source)}; pass one split, e.g. dataset['train']")
    return isinstance(source, (datasets.Dataset, datasets.IterableDataset))


def _dataset_length(dataset: "datasets.Dataset | datasets.IterableDataset") -> int | None:
    try:
        return len(dataset)
    except TypeError:  # IterableDataset has no length
        return None


def _iter_dataset_column(dataset: "datasets.Dataset | datasets.IterableDataset", column: str) -> Iterator[str]:
    names = dataset.column_names
    if names is not None and column not in names:
        raise ValueError(f"text_column={column!r} is not a column of the dataset; columns are {names}")
    for batch in dataset.iter(batch_size=1000):
        yield from _iter_strings(batch[column], where=f"dataset column {column!r}")


def _iter_strings(texts: Iterable[object], where: str = "the source") -> Iterator[str]:
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"item {index} of {where} is a {type(text).__name__}, not a str: {text!r:.80}")
        yield text


def _checked_file(path: PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"training file {path} does not exist")
    if not path.is_file():
        raise ValueError(f"training file {path} is not a regular file (a directory?)")
    if not os.access(path, os.R_OK):
        raise PermissionError(f"training file {path} is not readable (permissions)")
    return path


def _iter_files(paths: list[Path]) -> Iterator[str]:
    for path in paths:
        yield from read_utf8_chunks(path)


def read_utf8_chunks(path: Path, chunk_chars: int = FILE_CHUNK_CHARS) -> Iterator[str]:
    """The file's text in pieces of about `chunk_chars`, cut only where a cut cannot change
    GPT-2 pre-tokenization: before a line that starts with a letter or digit, when the line
    before ends with one. A newline between two non-space characters is always a pre-token of
    its own, so training on the pieces counts exactly the words of the whole file.

    Raises ValueError naming the file, byte offset and line of the first byte that is not UTF-8.
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
                raise ValueError(
                    f"{path}: not valid UTF-8 at byte offset {offset + error.start} (line {line_number}): "
                    f"{error.reason} ({raw[error.start:error.end]!r}). Text files must be UTF-8; "
                    "re-encode it, e.g. `iconv -f latin1 -t utf-8`."
                ) from None
            offset += len(raw)
            if size >= chunk_chars and _safe_cut(previous, line):
                yield "".join(pieces)
                pieces, size = [], 0
            pieces.append(line)
            size += len(line)
            previous = line
    if pieces:
        yield "".join(pieces)


def _safe_cut(previous_line: str, line: str) -> bool:
    return (
        len(previous_line) >= 2
        and previous_line.endswith("\n")
        and previous_line[-2].isalnum()
        and line[:1].isalnum()
    )


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
