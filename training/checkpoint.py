"""Crash-safe `accelerator.save_state` checkpoints.

Every write goes through `modeling_minigpt.files` (a temporary name beside its target, renamed
into place), so a process killed at any moment leaves either the old complete file/folder or the
new one. Checkpoint folders additionally carry a marker file written last; `latest_checkpoint`
only believes folders that have it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from accelerate import Accelerator

from modeling_minigpt.files import atomic_write_json, replace_dir, staging_dir

CHECKPOINT_MARKER = "checkpoint_complete.json"
_CHECKPOINT_RE = re.compile(r"^step_(\d+)$")


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_dir(checkpoints_root: str | os.PathLike[str], step: int) -> Path:
    return Path(checkpoints_root) / f"step_{step}"


def list_checkpoints(checkpoints_root: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """Complete checkpoints as (step, folder), oldest first; temporaries and unmarked folders are ignored."""
    root = Path(checkpoints_root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _CHECKPOINT_RE.match(child.name)
        if match and (child / CHECKPOINT_MARKER).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(checkpoints_root: str | os.PathLike[str]) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    found = list_checkpoints(checkpoints_root)
    return found[-1][1] if found else None


def save_checkpoint(
    accelerator: Accelerator, checkpoints_root: str | os.PathLike[str], step: int, keep_last: int
) -> Path:
    """`accelerator.save_state` into `.tmp-step_N`, mark it complete, rename to `step_N`, keep the last K.

    Must be called on every process: each writes its own RNG state file into the folder; the
    main process writes everything else and does the rename and the pruning.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    final = checkpoint_dir(checkpoints_root, step)
    tmp = staging_dir(final, clean=accelerator.is_main_process)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every rank's files are in tmp before it is declared complete
    if accelerator.is_main_process:
        atomic_write_json(tmp / CHECKPOINT_MARKER, {"step": step, "num_processes": accelerator.num_processes})
        replace_dir(tmp, final)
        for _, old in list_checkpoints(checkpoints_root)[:-keep_last]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, folder: str | os.PathLike[str]) -> int:
    """Restore model, optimizer, RNG and registered objects from `folder`; return its step."""
    folder = Path(folder)
    marker = folder / CHECKPOINT_MARKER
    if not marker.is_file():
        raise ValueError(f"{folder} is not a complete checkpoint (no {CHECKPOINT_MARKER})")
    saved = json.loads(marker.read_text())
    if saved["num_processes"] != accelerator.num_processes:
        raise ValueError(
            f"{folder} was written by {saved['num_processes']} processes but this run has "
            f"{accelerator.num_processes}: relaunch with the same number of processes to resume"
        )
    accelerator.load_state(str(folder))
    return int(saved["step"])
