"""Crash-safe `accelerator.save_state` checkpoints, and run folders.

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
from typing import Any

from accelerate import Accelerator

from modeling_minigpt.files import atomic_write_json, replace_dir, staging_dir

CHECKPOINT_MARKER = "checkpoint_complete.json"
RUN_CONFIG_NAME = "run_config.json"
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


def save_checkpoint(accelerator: Accelerator, checkpoints_root: str | os.PathLike[str], step: int, keep_last: int) -> Path:
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


# ----------------------------------------------------------------------------- run folders


class RunFolderError(ValueError):
    """The output folder cannot be used for this run (holds another run, or unrelated files)."""


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


def check_run_folder(
    output_dir: str | os.PathLike[str], fingerprint: dict[str, Any], *, resume: bool, overwrite: bool
) -> None:
    """Raise RunFolderError unless `output_dir` may hold this run. Reads only; writes nothing.

    `fingerprint` holds everything that must match for a resumed run to be the same run (model
    shape, tokenizer hash, data, optimisation settings). A folder is usable when it is missing or
    empty, when it holds this same run and `resume` is set, or when it holds some run and
    `overwrite` is set. A non-empty folder without a run_config.json is never touched.
    """
    output_dir = Path(output_dir)
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise RunFolderError(f"output folder {output_dir} exists and is not a folder")
    if not any(output_dir.iterdir()):
        return
    config_file = output_dir / RUN_CONFIG_NAME
    if not config_file.is_file():
        raise RunFolderError(
            f"output folder {output_dir} is not empty and holds no {RUN_CONFIG_NAME}: it is not a run folder, "
            "so it is neither resumed nor overwritten. Choose an empty or new folder."
        )
    if overwrite:
        return
    saved = json.loads(config_file.read_text())["fingerprint"]
    if not resume:
        raise RunFolderError(
            f"output folder {output_dir} already holds a run. Pass --resume to continue it "
            "or --overwrite to delete it and start again."
        )
    differences = _diff(saved, fingerprint)
    if differences:
        raise RunFolderError(
            f"cannot resume the run in {output_dir}: its configuration differs from this one:\n"
            + "\n".join(differences)
            + "\nUse the original settings to resume, or --overwrite / another output folder to start a new run."
        )


def start_run_folder(
    output_dir: str | os.PathLike[str], fingerprint: dict[str, Any], config: dict[str, Any], *, overwrite: bool
) -> Path:
    """Create (or, with `overwrite`, empty) the run folder and record the run's configuration.

    Call on the main process only, after `check_run_folder` passed.
    """
    output_dir = Path(output_dir)
    if overwrite and (output_dir / RUN_CONFIG_NAME).is_file():
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(output_dir / RUN_CONFIG_NAME, {"fingerprint": fingerprint, "config": config})
    return output_dir
