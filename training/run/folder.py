"""A run folder has one writer at a time, and holds one run that is never lost by accident.

`training.run.lifecycle` is the only caller: `open_run` checks rules 1-3 before any data is loaded,
writing nothing; `prepare` then applies 2-4 (takes the lock, checks the folder against the run's
fingerprint, sets a replaced run aside). The rules, in the order they are applied:

1. **Where** (`check_output_location`, reads only): the output path must be a folder, or be
   creatable (no parent is a file) on a writable file system.
2. **Who** (`RunLock`): the main process creates `run.lock` (pid, host, start time) with
   O_EXCL before anything else is written. A lock held by a live process refuses the run; a lock
   whose process is gone from this host (a killed run) is taken over, with a line saying so; a
   lock from another host is never taken over (delete it by hand once that run is gone).
3. **What** (`check_run_folder`, reads only): a missing or empty folder is free; one holding
   this same run may be resumed (`--resume`, same fingerprint); one holding any run may be
   replaced (`--overwrite`); a folder of other files is never touched.
4. **Replacing** (`--overwrite`): the old run is not deleted first. Its files move into
   `.old-run` inside the folder (into `.old-run.moving`, renamed when every file is in); the new
   run starts beside it; `.old-run` is deleted once the new run has its first complete
   checkpoint (`retire_replaced`). If the new run fails before that, the old one is moved back
   (`restore_replaced`). If it is killed, the next run on the folder finds `.old-run` and
   finishes the job (`recover_interrupted_overwrite`): the new run is kept if it has a complete
   checkpoint, otherwise the old run is restored. At every moment one complete run is on disk.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from modeling_minigpt.files import RETIRED_PREFIX, atomic_write_json, writing
from training.run.checkpoint import list_checkpoints
from training.saved.layout import LOCK, RunLayout

# Old run files during an --overwrite: `.old-run` (matched by modeling_minigpt.files.TEMPORARY_PATTERNS).
REPLACED = f"{RETIRED_PREFIX}run"
MOVING = f"{REPLACED}.moving"
_BOOKKEEPING = {LOCK, REPLACED, MOVING}


class RunFolderError(ValueError):
    """The output folder cannot be used for this run: another run writes it, or it holds another run or other files."""


# ----------------------------------------------------------------------------- 1. where


def check_output_location(root: Path) -> None:
    """RunFolderError unless `root` is a folder, or can be created, on a writable file system. Reads only."""
    if root.exists() and not root.is_dir():
        raise RunFolderError(f"output folder {root} exists and is not a folder: choose another --output_dir")
    existing = next(p for p in (root, *root.parents) if p.exists())
    if not existing.is_dir():
        raise RunFolderError(f"output folder {root} cannot be created: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        reason = "is on a read-only file system" if _read_only(existing) else "is not writable (permissions)"
        raise RunFolderError(f"output folder {root} cannot be written: {existing} {reason}")


def _read_only(path: Path) -> bool:
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)


# ----------------------------------------------------------------------------- 2. who


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def read_lock(root: Path) -> dict[str, Any] | None:
    """The lock's record, None without a lock; an unreadable lock reads as {} (stale)."""
    try:
        record = json.loads((root / LOCK).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return record if isinstance(record, dict) else {}


def check_lock(root: Path) -> dict[str, Any] | None:
    """RunFolderError if a live run holds `root`; else the stale lock's record (None without one). Reads only."""
    record = read_lock(root)
    if record is None or not record:
        return record
    pid, host = record.get("pid"), record.get("host")
    if host != socket.gethostname():
        raise RunFolderError(
            f"output folder {root} is locked by a run on host {host!r} (pid {pid}, started {record.get('started')}): "
            f"wait for it to finish, or delete {root / LOCK} if that run is gone"
        )
    if isinstance(pid, int) and pid != os.getpid() and _pid_alive(pid):
        raise RunFolderError(
            f"output folder {root} is in use by another run (pid {pid} on this host, started {record.get('started')}): "
            "wait for it to finish, or choose another --output_dir"
        )
    return record


class RunLock:
    """`root/run.lock`, created with O_EXCL by the one process that writes the run folder."""

    def __init__(self, root: Path, say: Callable[[str], None]):
        self.root, self.path, self.say = root, root / LOCK, say
        self.created_root = False

    def acquire(self) -> None:
        """Create the folder if needed and the lock in it; RunFolderError if a live run holds it."""
        stale = check_lock(self.root)
        with writing(self.root):
            self.created_root = not self.root.exists()
            self.root.mkdir(parents=True, exist_ok=True)
        if stale is not None:
            if stale.get("pid") != os.getpid():
                self.say(
                    f"taking over the stale lock of a run that is gone (pid {stale.get('pid')}, "
                    f"started {stale.get('started')})"
                )
            try:  # a rename, so that of two processes taking over the same stale lock only one wins
                os.replace(self.path, self.path.with_name(f".{LOCK}.stale.{os.getpid()}"))
                os.unlink(self.path.with_name(f".{LOCK}.stale.{os.getpid()}"))
            except FileNotFoundError:
                pass
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        with writing(self.path):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                check_lock(self.root)  # raises: another run took it first
                raise RunFolderError(
                    f"output folder {self.root} was locked by another run at the same moment"
                ) from None
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(record, handle)

    def release(self) -> None:
        """Remove the lock (and the folder, if this run created it and left it empty)."""
        if (read_lock(self.root) or {}).get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        if self.created_root and self.root.is_dir() and not any(self.root.iterdir()):
            self.root.rmdir()


# ----------------------------------------------------------------------------- 3. what


def _diff(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """Human-readable differences between two nested dicts, one line per differing leaf."""
    lines = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<missing>"), current.get(key, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict):
            lines += _diff(a, b, f"{prefix}{key}.")
        elif a != b:
            lines.append(f"  {prefix}{key}: saved run has {a!r}, this run has {b!r}")
    return lines


def run_entries(root: Path) -> list[Path]:
    """What the folder holds besides the lock and an --overwrite's bookkeeping."""
    return sorted(p for p in root.iterdir() if p.name not in _BOOKKEEPING) if root.is_dir() else []


def saved_fingerprint(layout: RunLayout) -> dict[str, Any]:
    """The fingerprint recorded in the folder's run_config.json; RunFolderError if it is damaged."""
    try:
        saved = json.loads(layout.run_config.read_text(encoding="utf-8"))["fingerprint"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise RunFolderError(
            f"{layout.run_config} is damaged ({type(error).__name__}: {error}): the run it describes cannot be "
            "checked. Use --overwrite to start again, or another --output_dir"
        ) from None
    if not isinstance(saved, dict):
        raise RunFolderError(f"{layout.run_config} is damaged: its fingerprint is not a JSON object")
    return saved


def check_run_folder(
    output_dir: str | os.PathLike[str], fingerprint: dict[str, Any] | None, *, resume: bool, overwrite: bool
) -> None:
    """Raise RunFolderError unless `output_dir` may hold this run (rule 3 of the module docstring). Reads only.

    `fingerprint` holds everything that must match for a resumed run to be the same run (model
    shape, tokenizer hash, data contents, optimisation settings); None checks all but that.
    """
    layout = RunLayout(Path(output_dir))
    check_output_location(layout.root)
    if not run_entries(layout.root):
        return
    if not layout.run_config.is_file():
        raise RunFolderError(
            f"output folder {layout.root} is not empty and holds no {layout.run_config.name}: it is not a run "
            "folder, so it is neither resumed nor overwritten. Choose an empty or new folder."
        )
    if overwrite:
        return
    saved = saved_fingerprint(layout)
    if not resume:
        raise RunFolderError(
            f"output folder {layout.root} already holds a run. Pass --resume to continue it "
            "or --overwrite to replace it with a new one."
        )
    if fingerprint is None:
        return
    differences = _diff(saved, fingerprint)
    if differences:
        raise RunFolderError(
            f"cannot resume the run in {layout.root}: its configuration differs from this one:\n"
            + "\n".join(differences)
            + "\nUse the original settings to resume, or --overwrite / another output folder to start a new run."
        )


# ----------------------------------------------------------------------------- 4. replacing


def _move_entries(target: Path, entries: list[Path]) -> None:
    for entry in entries:
        os.replace(entry, target / entry.name)


def replace_run(root: Path) -> None:
    """Move the run in `root` into `root/.old-run` (the --overwrite of rule 4). Main process, lock held."""
    moving = root / MOVING
    with writing(moving):
        moving.mkdir()
        _move_entries(moving, run_entries(root))
        os.replace(moving, root / REPLACED)


def has_complete_checkpoint(root: Path) -> bool:
    return bool(list_checkpoints(RunLayout(root).checkpoints))


def restore_replaced(root: Path) -> bool:
    """Put the run of `.old-run` (or a half-moved `.old-run.moving`) back, removing what a new run wrote."""
    old = next((root / name for name in (REPLACED, MOVING) if (root / name).is_dir()), None)
    if old is None:
        return False
    with writing(root):
        if old.name == REPLACED:  # the new run may have written files: they go
            for entry in run_entries(root):
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        _move_entries(root, sorted(old.iterdir()))
        old.rmdir()
    return True


def retire_replaced(root: Path) -> None:
    """The new run has a complete checkpoint: delete the run it replaced."""
    old = root / REPLACED
    if old.is_dir():
        with writing(old):
            shutil.rmtree(old)


def recover_interrupted_overwrite(root: Path, say: Callable[[str], None]) -> None:
    """Finish an --overwrite whose process died (rule 4), before the folder is checked. Lock held."""
    if (root / MOVING).is_dir() or ((root / REPLACED).is_dir() and not has_complete_checkpoint(root)):
        restore_replaced(root)
        say(f"an --overwrite of {root} was interrupted before the new run's first checkpoint: restored the old run")
    elif (root / REPLACED).is_dir():
        retire_replaced(root)
        say(f"an --overwrite of {root} was interrupted after the new run's first checkpoint: removed the old run")


def record_run(root: Path, fingerprint: dict[str, Any], config: dict[str, Any]) -> None:
    """Write run_config.json: the fingerprint a resume is checked against, and the full configuration."""
    atomic_write_json(RunLayout(root).run_config, {"fingerprint": fingerprint, "config": config})
