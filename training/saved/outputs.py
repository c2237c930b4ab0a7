"""Where a script may write: the one rule every script's outputs go through, before any work.

1. **Apart from the inputs.** An output that is, contains or lies inside one of the run's inputs
   (model, tokenizer, data) is refused, with or without --overwrite: `evaluate --output_json
   <model>/config.json` would replace the model's config, `sft --model_path <run>/model
   --output_dir <run> --overwrite` would retire the run holding its own base model. Paths are
   compared after resolving links, so a link cannot lead around the rule.
2. **Nothing replaced that the script did not write.** An output file that exists, or an output
   folder that is not empty, is replaced only with --overwrite (a run folder has its own,
   finer rule: `training.run.folder`, which resumes or replaces only a run).

Inputs are found by the names of the argument fields that hold them (`INPUT_FIELDS`), so a job or a
script passes its argument objects and needs no list of its own.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

PathLike = str | os.PathLike[str]

# Argument fields that name something a script reads (a folder or a file); any dataclass field of
# these names is an input. A value that is no existing path (a dataset name, the embedded corpus) is skipped.
INPUT_FIELDS = (
    "model",
    "model_path",
    "tokenizer",
    "tokenizer_path",
    "files",
    "dataset",
    "text_file",
    "train_file",
    "validation_file",
    "test_file",
    "from_gpt2",
    "to_gpt2",
)


def named_inputs(*argument_objects: Any) -> dict[str, PathLike]:
    """{flag: path} of every input named by the `INPUT_FIELDS` of `argument_objects` (dataclasses)."""
    found: dict[str, PathLike] = {}
    for arguments in argument_objects:
        if not is_dataclass(arguments):
            continue
        for item in fields(arguments):
            value = getattr(arguments, item.name)
            if item.name not in INPUT_FIELDS or not value:
                continue
            values = value if isinstance(value, (list, tuple)) else [value]
            for i, path in enumerate(values):
                found[f"--{item.name}" + (f" [{i}]" if len(values) > 1 else "")] = path
    return found


def check_apart(outputs: Mapping[str, PathLike | None], inputs: Mapping[str, PathLike | None]) -> None:
    """ValueError unless every output lies apart from every existing input (rule 1). Reads only."""
    for out_flag, output in outputs.items():
        if output is None:
            continue
        out = Path(os.path.realpath(output))
        for in_flag, source in _existing(inputs):
            inp = Path(os.path.realpath(source))
            if out == inp:
                relation = "is"
            elif inp.is_relative_to(out):
                relation = "contains"
            elif out.is_relative_to(inp):
                relation = "lies inside"
            else:
                continue
            raise ValueError(
                f"{out_flag} {output} {relation} {in_flag} {source}: a script never writes into its own inputs, "
                "not even with --overwrite; choose another output path"
            )


def check_outputs(
    outputs: Mapping[str, PathLike | None], inputs: Mapping[str, PathLike | None], overwrite: bool
) -> None:
    """ValueError naming the output that breaks the module's rules: one that is, contains or lies
    inside an input; an existing file or a folder that is not empty, without `overwrite`. Reads only."""
    check_apart(outputs, inputs)
    if overwrite:
        return
    for flag, output in outputs.items():
        path = Path(output) if output is not None else None
        if path is None or not (path.exists() or path.is_symlink()):
            continue
        if path.is_dir() and not any(path.iterdir()):
            continue
        what = "is not empty" if path.is_dir() else "exists"
        raise ValueError(f"{flag} {output} {what}: pass --overwrite to replace it, or choose another path")


def _existing(inputs: Mapping[str, PathLike | None]) -> Iterable[tuple[str, PathLike]]:
    return ((flag, path) for flag, path in inputs.items() if path and Path(path).exists())
