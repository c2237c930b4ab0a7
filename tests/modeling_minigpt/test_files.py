"""modeling_minigpt/files.py: crash-safe files: atomic writes, whole-folder swaps, and figures written 0644."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from modeling_minigpt.files import (
    TEMPORARY_PATTERNS,
    atomic_write_text,
    pyplot,
    replace_dir,
    save_figure,
    staging_dir,
)


def test_atomic_write_leaves_old_content_when_the_writer_fails(tmp_path, monkeypatch):
    path = tmp_path / "f.json"
    atomic_write_text(path, "old")

    def broken_write(self, text, encoding=None):
        Path.write_bytes(self, b"half")
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", broken_write)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(path, "new")
    monkeypatch.undo()
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]  # no temporary left behind


def test_replace_dir_swaps_whole_folders(tmp_path):
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "a").write_text("new")
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "b").write_text("old")
    replace_dir(tmp_path / "new", tmp_path / "dst")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]
    assert [p.name for p in (tmp_path / "dst").iterdir()] == ["a"]


def test_figures_are_written_whole_and_shared_readable(tmp_path):
    fig, ax = pyplot().subplots()
    ax.plot([1, 2, 3])
    path = save_figure(fig, tmp_path / "plots" / "curve.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["curve.png"]
    assert not pyplot().fignum_exists(fig.number)  # closed once written


def test_temporaries_are_recognised_by_the_patterns(tmp_path):
    from fnmatch import fnmatch

    folder = tmp_path / "model"
    names = [staging_dir(folder).name, f".old-{folder.name}", ".config.json.k3x9.tmp"]
    assert all(any(fnmatch(name, pattern) for pattern in TEMPORARY_PATTERNS) for name in names)
    assert not any(fnmatch("config.json", pattern) for pattern in TEMPORARY_PATTERNS)


def test_a_full_disk_is_named_even_when_the_writer_loses_the_errno(tmp_path, monkeypatch):
    """torch's writer reports a full disk as "unexpected pos ..." (no errno): with no room left on
    the disk the failure reads "no space left on device writing <file>"."""
    import errno
    import shutil

    from modeling_minigpt.files import WriteError, writing

    target = tmp_path / "optimizer.pt"
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=4096))
    with pytest.raises(WriteError) as caught, writing(target):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 8512 vs 8404")
    assert caught.value.errno == errno.ENOSPC and str(caught.value) == f"no space left on device writing {target}"
    with pytest.raises(WriteError, match=f"read-only file system writing {target}"), writing(target):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.undo()
    with pytest.raises(ValueError, match="a bug"), writing(target):  # not the file system's fault: unchanged
        raise ValueError("a bug")
