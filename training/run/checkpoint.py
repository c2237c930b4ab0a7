"""Resumable checkpoints in formats that cannot run code, written crash-safe, checked before use.

A checkpoint is the folder `checkpoints/step_N`:

    model.safetensors          the unwrapped model's tensors (shared/tied tensors stored once)
    optimizer.pt               the optimizer state keyed by parameter name, whole tensors
                               (torch.distributed.checkpoint's full optimizer state dict: the form
                               `training.run.distributed.full_training_state` gathers from an FSDP2
                               run, so a sharded job writes and reads these same files); tensors
                               and plain values only, read back with `torch.load(weights_only=True)`,
                               which refuses anything else
    train_state.json           the loop's state (`TrainState`), the Accelerator's step, the grad scaler
    rng_rank{r}.safetensors    per process: the torch RNG (CPU and every CUDA device), numpy's and
                               Python's `random` state, and each data loader's own generator
    checkpoint_complete.json   the manifest, written last: format, step, number of processes, and
                               every file above with its size and SHA-256

Nothing here is a pickle, so a crafted checkpoint can at worst hold wrong numbers, and those are
caught too: before anything is loaded, every file is checked against the manifest (present,
same size, same SHA-256, no file it does not list). A checkpoint that fails the check is damaged;
`resume` then takes the newest one that passes and says which it skipped and why.

Writing: every rank writes its files into `.tmp-step_N`, then the main process hashes them,
writes the manifest and renames the folder to `step_N` (`modeling_minigpt.files`), so a process
killed at any moment leaves the previous complete checkpoint and at most a temporary folder.
A model sharded with FSDP2 — by `pretrain --fsdp` (`training.run.distributed.shard_for_training`) or
by Accelerate's own FSDP2 plugin (`--config_file scripts/configs/accelerate/fsdp2.yaml`, whose
`prepare` calls the same `fully_shard`) — is gathered whole to the main process for the same files
and scattered back on resume, so a checkpoint does not depend on how many ranks wrote it.
Accelerate's DeepSpeed ZeRO-2/ZeRO-3 (`deepspeed_zero{2,3}.yaml`) keeps the fp32 weights and AdamW
moments in flat per-rank slices: `training.run.zero` gathers them by parameter name into the same
files and scatters them back. Accelerate's FSDP1, and DeepSpeed's other stages and offloading, keep
state this format does not gather: `check_supported` refuses those before a run writes anything.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, broadcast
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict

from modeling_minigpt.files import atomic_path, atomic_write_json, file_sha256, replace_dir, staging_dir, writing
from tokenization.corpus import DataError
from training.run import zero
from training.run.arguments import LoopArguments
from training.run.distributed import full_training_state, is_sharded, load_full_training_state

CHECKPOINT_MARKER = "checkpoint_complete.json"
FORMAT = "minigpt-checkpoint-v1"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "train_state.json"
_CHECKPOINT_RE = re.compile(r"^step_(\d+)$")
# Whole tensors keyed by parameter name, whatever the wrapping (DDP) or sharding (FSDP2).
_FULL = StateDictOptions(full_state_dict=True)


class CheckpointError(DataError):
    """A checkpoint that cannot be used (damaged, incomplete, from another setup); the message says which and why."""


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.safetensors"


def expected_files(num_processes: int) -> list[str]:
    """Every file of a checkpoint written by `num_processes` processes, besides the manifest."""
    return [MODEL_FILE, OPTIMIZER_FILE, STATE_FILE, *(rng_file(rank) for rank in range(num_processes))]


@dataclass
class Resumable:
    """What a checkpoint saves and restores: the prepared model and optimizer, the loop's state
    (an object with JSON-able `state_dict`/`load_state_dict`) and the data loaders whose generators
    the data order depends on."""

    model: torch.nn.Module
    optimizer: Any  # state_dict() / load_state_dict(), tensors and plain values only
    state: Any
    loaders: Sequence[Any] = ()


# ----------------------------------------------------------------------------- listing


def checkpoint_dir(checkpoints_root: str | os.PathLike[str], step: int) -> Path:
    return Path(checkpoints_root) / f"step_{step}"


def list_checkpoints(checkpoints_root: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """Checkpoints that have a manifest, as (step, folder), oldest first; temporaries are ignored."""
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
    """The checkpoint with a manifest and the highest step, or None (not verified: see `verify_checkpoint`)."""
    found = list_checkpoints(checkpoints_root)
    return found[-1][1] if found else None


def verify_checkpoint(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of `folder` if every file matches it; CheckpointError saying what does not."""
    folder = Path(folder)
    marker = folder / CHECKPOINT_MARKER
    try:
        manifest = json.loads(marker.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{folder} is incomplete: it has no {CHECKPOINT_MARKER} (written last)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{marker} is damaged: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(
            f"{marker} is not a {FORMAT} manifest (a damaged file, or a checkpoint of an older MiniGPT in "
            "accelerate's pickle-based format, which is not loaded)"
        )
    try:
        files, step, num_processes = manifest["files"], int(manifest["step"]), int(manifest["num_processes"])
        listed = {name: (int(entry["size"]), str(entry["sha256"])) for name, entry in files.items()}
    except (KeyError, TypeError, ValueError, AttributeError):
        raise CheckpointError(f"{marker} is damaged: it lacks the step, the processes or the file list") from None
    if sorted(listed) != sorted(expected_files(num_processes)):
        raise CheckpointError(f"{marker} is damaged: it lists {sorted(listed)}")
    present = sorted(p.name for p in folder.iterdir() if p.name != CHECKPOINT_MARKER)
    unexpected = sorted(set(present) - set(listed))
    if unexpected:
        raise CheckpointError(f"{folder} holds files it did not write: {unexpected}")
    for name, (size, digest) in listed.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{folder} is incomplete: {name} is missing")
        if path.stat().st_size != size:
            raise CheckpointError(f"{path} is damaged: {path.stat().st_size:,} bytes, {size:,} were written")
        if file_sha256(path) != digest:
            raise CheckpointError(f"{path} is damaged: its content changed since it was written (SHA-256 differs)")
    return {**manifest, "step": step, "num_processes": num_processes}


# ----------------------------------------------------------------------------- saving


def check_supported(accelerator: Accelerator, args: LoopArguments) -> None:
    """Refuse a setup whose training state this format cannot hold, before anything is written:
    FSDP2 and DeepSpeed ZeRO-2/3 (gathered by parameter name, see the module docstring) are held;
    FSDP1 is not, nor what `training.run.zero.check_deepspeed` refuses."""
    if accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2:
        raise ValueError(
            "checkpoints of FSDP1 runs are not supported: set fsdp_version: 2 in the Accelerate config "
            "(scripts/configs/accelerate/fsdp2.yaml)"
        )
    if zero.is_deepspeed(accelerator):
        zero.check_deepspeed(accelerator, args)


def save_checkpoint(
    accelerator: Accelerator, checkpoints_root: str | os.PathLike[str], step: int, keep_last: int, parts: Resumable
) -> Path:
    """Write `parts` as `checkpoints_root/step_N` (see the module docstring), then keep the last `keep_last`.

    Every process must call it: each writes its RNG states, the main process everything else,
    the manifest, the rename and the pruning.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    final = checkpoint_dir(checkpoints_root, step)
    tmp = staging_dir(final, clean=accelerator.is_main_process)
    accelerator.wait_for_everyone()
    model = accelerator.unwrap_model(parts.model)
    deepspeed = zero.is_deepspeed(accelerator)
    sharded = deepspeed or is_sharded(model)
    # Collectives: every rank sends its shards, the main process gets whole tensors.
    if deepspeed:
        model_state, optimizer_state = zero.full_training_state(model, parts.optimizer, accelerator.is_main_process)
    elif sharded:
        model_state, optimizer_state = full_training_state(model, _unwrap_optimizer(parts.optimizer))
    if accelerator.is_main_process:
        with writing(tmp):
            tmp.mkdir(parents=True, exist_ok=True)
        with atomic_path(tmp / MODEL_FILE) as path:
            if sharded:  # every name kept (tied ones as copies), as the sharded model loads them back
                save_file({name: tensor.detach().clone().contiguous() for name, tensor in model_state.items()}, path)
            else:
                save_model(model, str(path))
        if not sharded:
            optimizer_state = get_optimizer_state_dict(model, _unwrap_optimizer(parts.optimizer), options=_FULL)
        _check_plain(optimizer_state, "the optimizer state")
        with atomic_path(tmp / OPTIMIZER_FILE) as path:
            torch.save(optimizer_state, path)
        scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
        state = {"train_state": parts.state.state_dict(), "accelerator_step": accelerator.step, "scaler": scaler}
        atomic_write_json(tmp / STATE_FILE, state)
    accelerator.wait_for_everyone()  # the folder exists before the other ranks write into it
    tensors, metadata = _rng_states(parts.loaders)
    with atomic_path(tmp / rng_file(accelerator.process_index)) as path:
        save_file(tensors, str(path), metadata=metadata)
    accelerator.wait_for_everyone()  # every rank's files are in tmp before the manifest vouches for them
    if accelerator.is_main_process:
        files = {
            name: {"size": (tmp / name).stat().st_size, "sha256": file_sha256(tmp / name)}
            for name in expected_files(accelerator.num_processes)
        }
        manifest = {"format": FORMAT, "step": step, "num_processes": accelerator.num_processes, "files": files}
        atomic_write_json(tmp / CHECKPOINT_MARKER, manifest)
        replace_dir(tmp, final)
        for _, old in list_checkpoints(checkpoints_root)[:-keep_last]:
            with writing(old):
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def _unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside Accelerate's wrapper (whose step() would also drive the grad scaler)."""
    return getattr(optimizer, "optimizer", optimizer)


_PLAIN = (str, int, float, bool, type(None), torch.Tensor)


def _check_plain(value: Any, what: str) -> None:
    """Refuse, at save time, what `torch.load(weights_only=True)` would refuse at resume time."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            _check_plain(key, what)
            _check_plain(item, what)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _check_plain(item, what)
    elif not isinstance(value, _PLAIN):
        raise TypeError(
            f"{what} holds a {type(value).__name__} ({value!r:.60}): checkpoints keep only tensors and plain values"
        )


def _loader_generators(loaders: Iterable[Any]) -> list[torch.Generator]:
    """Each distinct torch.Generator a loader or its sampler draws from, in a fixed order."""
    found: list[torch.Generator] = []
    for loader in loaders:
        holders = (
            loader,
            getattr(loader, "sampler", None),
            getattr(getattr(loader, "batch_sampler", None), "sampler", None),
        )
        for holder in holders:
            generator = getattr(holder, "generator", None)
            if isinstance(generator, torch.Generator) and not any(generator is g for g in found):
                found.append(generator)
    return found


def _rng_states(loaders: Sequence[Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """This process's random states as tensors (and the few scalars as safetensors metadata)."""
    numpy_state = np.random.get_state()
    python_version, python_state, gauss_next = random.getstate()
    tensors = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(numpy_state[1].astype(np.int64)),
        "python": torch.tensor(python_state, dtype=torch.int64),
    }
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{index}"] = state
    for index, generator in enumerate(_loader_generators(loaders)):
        tensors[f"loader_generator.{index}"] = generator.get_state()
    scalars = {
        "numpy": [numpy_state[0], int(numpy_state[2]), int(numpy_state[3]), float(numpy_state[4])],
        "python": [python_version, gauss_next],
        "loader_generators": len(_loader_generators(loaders)),
    }
    return tensors, {"scalars": json.dumps(scalars)}


def _set_rng_states(path: Path, loaders: Sequence[Any]) -> None:
    with open(path, "rb") as handle:
        metadata = json.loads(_safetensors_metadata(handle)["scalars"])
    tensors = load_file(str(path))
    generators = _loader_generators(loaders)
    if metadata["loader_generators"] != len(generators):
        raise CheckpointError(
            f"{path} holds {metadata['loader_generators']} data loader generators, this run has {len(generators)}"
        )
    torch.set_rng_state(tensors["torch"])
    name, pos, has_gauss, cached = metadata["numpy"]
    np.random.set_state((name, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, gauss_next = metadata["python"]
    random.setstate((version, tuple(tensors["python"].tolist()), gauss_next))
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[f"cuda.{i}"] for i in range(torch.cuda.device_count())])
    for index, generator in enumerate(generators):
        generator.set_state(tensors[f"loader_generator.{index}"])


def _safetensors_metadata(handle: Any) -> dict[str, str]:
    length = int.from_bytes(handle.read(8), "little")
    return json.loads(handle.read(length)).get("__metadata__", {})


# ----------------------------------------------------------------------------- loading


def load_checkpoint(accelerator: Accelerator, folder: str | os.PathLike[str], parts: Resumable) -> int:
    """Restore `parts` from a checkpoint `verify_checkpoint` passed; return its step.

    Every process calls it and reads its own RNG file.
    """
    folder = Path(folder)
    manifest = json.loads((folder / CHECKPOINT_MARKER).read_text(encoding="utf-8"))
    if manifest["num_processes"] != accelerator.num_processes:
        raise CheckpointError(
            f"{folder} was written by {manifest['num_processes']} processes but this run has "
            f"{accelerator.num_processes}: relaunch with the same number of processes to resume"
        )
    device = accelerator.device
    model, optimizer = accelerator.unwrap_model(parts.model), _unwrap_optimizer(parts.optimizer)
    try:
        if zero.is_deepspeed(accelerator):  # every rank reads the whole states and keeps its slices
            model_state = load_file(str(folder / MODEL_FILE))
            optimizer_state = torch.load(folder / OPTIMIZER_FILE, weights_only=True)
            zero.load_full_training_state(model, parts.optimizer, model_state, optimizer_state)
        elif is_sharded(model):  # a collective: the main process reads the whole states, every rank keeps its shards
            main = accelerator.is_main_process
            model_state = load_file(str(folder / MODEL_FILE)) if main else {}
            optimizer_state = torch.load(folder / OPTIMIZER_FILE, weights_only=True) if main else {}
            load_full_training_state(model, optimizer, model_state, optimizer_state)
        else:
            load_model(model, str(folder / MODEL_FILE), strict=True, device=str(device))
            optimizer_state = torch.load(folder / OPTIMIZER_FILE, map_location=device, weights_only=True)
            set_optimizer_state_dict(model, optimizer, optimizer_state, options=_FULL)
        state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
        parts.state.load_state_dict(state["train_state"])
        accelerator.step = int(state["accelerator_step"])
        if accelerator.scaler is not None and state["scaler"] is not None:
            accelerator.scaler.load_state_dict(state["scaler"])
        _set_rng_states(folder / rng_file(accelerator.process_index), parts.loaders)
    except (OSError, RuntimeError, ValueError, KeyError, TypeError, SafetensorError, pickle.UnpicklingError) as error:
        raise CheckpointError(f"{folder} does not fit this run: {type(error).__name__}: {error}") from None
    return int(manifest["step"])


def resume(
    accelerator: Accelerator, checkpoints_root: str | os.PathLike[str], parts: Resumable, say: Callable[[str], None]
) -> int | None:
    """Load the newest checkpoint that passes `verify_checkpoint`; return its step, None if there is none.

    The main process verifies (damaged ones are skipped, each with a line through `say`) and
    tells the others which step to load. Checkpoints that exist but are all damaged are an error:
    starting over would silently throw away the run.
    """
    candidates = list_checkpoints(checkpoints_root)
    chosen, problems = -1, []
    if accelerator.is_main_process:
        for step, folder in reversed(candidates):
            try:
                verify_checkpoint(folder)
            except CheckpointError as error:
                problems.append(str(error))
                say(f"skipping checkpoint {folder.name}: {error}")
                continue
            chosen = step
            break
        if chosen >= 0 and problems:
            say(f"resuming from the previous complete checkpoint, step_{chosen}")
    if accelerator.num_processes > 1:
        chosen = int(broadcast(torch.tensor([chosen], device=accelerator.device), from_process=0).item())
    if chosen < 0:
        if candidates:
            detail = "; ".join(problems) if problems else "see the main process's output"
            raise CheckpointError(
                f"no intact checkpoint in {checkpoints_root} ({detail}). "
                "Use --overwrite to start the run again, or another --output_dir"
            )
        return None
    return load_checkpoint(accelerator, checkpoint_dir(checkpoints_root, chosen), parts)
