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
"""

from __future__ import annotations

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


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary file path beside `path`; rename it onto `path` if the block succeeds.

    For writers that want a path rather than a file object (`savefig`, `torch.save`, ...).
    """
    path = Path(path)
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


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write `text` to `path` so that readers see the old content or the new, never a prefix."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def staging_dir(folder: str | os.PathLike[str], clean: bool = True) -> Path:
    """`.tmp-<name>` beside `folder`, to build it in before `replace_dir`; with `clean`, one left
    by a killed run is removed first (only one process of a run should clean)."""
    folder = Path(folder)
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
