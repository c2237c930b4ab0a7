"""Crash-safe, shared-readable files: one writer for every package (model figures, tokenizer views, runs).

Every write goes to a temporary name beside its target and is renamed into place, so a process
killed at any moment leaves either the old complete file or folder or the new one, never a
half-written thing that looks complete. Files are written 0644: outputs are meant to be shared.

It lives in the model package, the bottom of the dependency chain (modeling_minigpt <-
tokenization <- training), because `modeling_minigpt.visualize` writes figures too and may import
nothing of ours but its own package.

Temporaries are named so that `TEMPORARY_PATTERNS` recognises them (the push to the Hub leaves
them out): `.<name>.<random>.tmp` for files, `.tmp-<name>` for a folder being built and
`.old-<name>` for a replaced folder about to be deleted.

A write that fails for a reason of the file system (a full disk, a read-only or foreign folder)
raises `WriteError`, which names the file being written and the reason in words. Libraries do
not always keep the reason: torch's writer reports a full disk as "unexpected pos 8512 vs 8404",
so a write that fails while the disk has no room left is reported as ENOSPC.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

TMP_SUFFIX = ".tmp"
STAGING_PREFIX = ".tmp-"
RETIRED_PREFIX = ".old-"
# fnmatch patterns (relative to a folder; `*` also matches "/") of every temporary written here.
TEMPORARY_PATTERNS = [f"*{TMP_SUFFIX}", f"{STAGING_PREFIX}*", f"{RETIRED_PREFIX}*"]


# Less free space than this after a failed write: the disk was full (see `writing`).
_FULL_DISK_BYTES = 1 << 20
# What libraries that drop the errno say instead (safetensors' Rust I/O errors, Python's strerror).
_ERRNO_WORDS = {
    errno.ENOSPC: ("No space left on device", "StorageFull", "os error 28"),
    errno.EROFS: ("Read-only file system", "ReadOnlyFilesystem", "os error 30"),
    errno.EDQUOT: ("Disk quota exceeded", "os error 122"),
}


class WriteError(OSError):
    """A file or folder could not be written: `str()` is "<reason> writing <path>", e.g.
    "no space left on device writing runs/x/checkpoints/step_10/optimizer.pt"."""

    def __init__(self, code: int, path: str | os.PathLike[str], detail: str = ""):
        super().__init__(code, os.strerror(code), str(path))
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.strerror[0].lower()}{self.strerror[1:]} writing {self.filename}"


def _errno_of(error: BaseException, folder: Path) -> int | None:
    """The errno behind a failed write, from the exception chain, a library's words, or the free space left."""
    chain, seen = [], error
    while seen is not None and len(chain) < 8:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for item in chain:
        if isinstance(item, OSError) and item.errno:
            return item.errno
    text = " ".join(str(item) for item in chain)
    for code, words in _ERRNO_WORDS.items():
        if any(word in text for word in words):
            return code
    try:
        if shutil.disk_usage(folder).free < _FULL_DISK_BYTES:
            return errno.ENOSPC
    except OSError:
        pass
    return None


@contextmanager
def writing(path: str | os.PathLike[str]) -> Iterator[None]:
    """Run a block that writes `path`; a failure of the file system becomes a `WriteError` naming it.

    Other exceptions (a bug, a value a writer refuses) pass through unchanged.
    """
    path = Path(path)
    try:
        yield
    except WriteError:
        raise
    except Exception as error:
        folder = next((p for p in (path, *path.parents) if p.exists()), Path.cwd())
        code = _errno_of(error, folder)
        if code is None:
            raise
        raise WriteError(code, path, str(error)) from error


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary file path beside `path`; rename it onto `path` if the block succeeds.

    For writers that want a path rather than a file object (`savefig`, `torch.save`, ...).
    """
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
        os.close(fd)
        os.chmod(tmp, 0o644)  # mkstemp makes owner-only files; outputs are meant to be shared
        try:
            yield Path(tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a file's bytes, hex (about 1 ms for tinyshakespeare's 1.1 MB here, measured under load)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write `text` to `path` so that readers see the old content or the new, never a prefix."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def staging_dir(folder: str | os.PathLike[str], clean: bool = True, unique: bool = False) -> Path:
    """`.tmp-<name>` beside `folder`, to build it in before `replace_dir`; with `clean`, one left
    by a killed run is removed first (only one process of a run should clean). With `unique`, a
    new empty `.tmp-<name>.<random>` instead, for a folder that independent processes may build
    at the same time (a shared cache): none of them removes another's."""
    folder = Path(folder)
    if unique:
        folder.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{folder.name}.", dir=folder.parent))
    staging = folder.with_name(f"{STAGING_PREFIX}{folder.name}")
    if clean and staging.exists():
        shutil.rmtree(staging)
    return staging


def replace_dir(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Move the finished folder `src` to `dst`, replacing any folder already there.

    `os.replace` cannot overwrite a non-empty folder, so an old `dst` is first renamed aside and
    deleted only after the new one is in place: at every instant one complete folder exists.
    """
    src, dst = Path(src), Path(dst)
    old = dst.with_name(f"{RETIRED_PREFIX}{dst.name}")
    with writing(dst):
        if old.exists():
            shutil.rmtree(old)
        if dst.exists():
            os.replace(dst, old)
        os.replace(src, dst)
        if old.exists():
            shutil.rmtree(old)
    return dst


def pyplot():
    """matplotlib.pyplot on the Agg backend: no display needed, safe in tests, servers and workers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure: Figure, path: str | os.PathLike[str], dpi: int = 120) -> Path:
    """Write `figure` as a PNG atomically (0644), then close it: the one way figures reach disk."""
    try:
        with atomic_path(path) as tmp:
            figure.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        pyplot().close(figure)
    return Path(path)
