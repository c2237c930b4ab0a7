"""What every script shares: typed dataclasses from a YAML file and flags, and one way to fail.

Every script has one shape: argument dataclasses -> `main(argv) -> int` -> one library call,
with bad input reported as one `error: ...` line on stderr and exit code 1, never a traceback
(`USER_ERRORS`, `report_error`). `report_error` is the one place where an exception becomes the
sentence a user reads: the package's own errors speak for themselves, and what the system, the
network or a library raises is put in words here. Kept free of heavy imports (no peft, no
datasets).
"""

from __future__ import annotations

import errno
import math
import os
import sys
import types
import typing
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import httpx2
import yaml
from transformers import HfArgumentParser


def parse_config_args(
    argument_classes: Sequence[type], argv: Sequence[str] | None, description: str | None = None
) -> tuple[Any, ...]:
    """Typed dataclasses from CLI flags, optionally after a leading YAML/JSON file of defaults.

    `script.py run.yaml --max_steps 10`: the file's keys must be flags of `argument_classes`
    (ValueError listing the unknown ones otherwise), and each value must have its flag's type
    (argparse converts the flags' strings, but not a file's values: `per_device_batch_size: 8.5`
    would otherwise reach the run as a float); flags after it override it.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _Parser(argument_classes, description=description)
    if argv and Path(argv[0]).suffix in {".yaml", ".yml", ".json"}:
        path = Path(argv[0])
        if not path.is_file():
            raise ValueError(f"config file {path} not found")
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            raise ValueError(f"{path} is not valid YAML: {error}") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path} must hold a mapping of flag names to values, got {type(values).__name__}")
        hints = {f.name: typing.get_type_hints(cls)[f.name] for cls in argument_classes for f in fields(cls)}
        unknown = sorted(set(values) - set(hints))
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown}; run with --help for the accepted flags")
        parser.set_defaults(**{name: _typed(value, hints[name], f"{path}: {name}") for name, value in values.items()})
        argv = argv[1:]
    *groups, unknown_flags = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown_flags:
        raise ValueError(f"unknown arguments {' '.join(unknown_flags)}; run with --help for the accepted flags")
    for arguments in groups:
        check_finite(arguments)
    return tuple(groups)


def check_finite(arguments: Any) -> None:
    """ValueError naming the first float field of the dataclass `arguments` that is inf or nan.

    `--learning_rate inf` or YAML's `.inf` / `.nan` pass comparisons such as "> 0" (nan fails
    every comparison, so `x <= 0` is False), and would reach the run as a value it cannot use.
    """
    for item in fields(arguments):
        value = getattr(arguments, item.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"--{item.name} must be a finite number, got {value}")


class _Parser(HfArgumentParser):
    """HfArgumentParser whose refusals (a missing required flag, a value of the wrong type, an
    unknown choice) raise ValueError like every other bad input, so a script reports them as its one
    `error: ...` line with exit code 1; argparse's own `error` prints its usage block and exits 2."""

    def error(self, message: str):
        raise ValueError(f"{message}; run with --help for the accepted flags")


def _typed(value: Any, hint: Any, where: str) -> Any:
    """`value` as the type `hint` of its field, or ValueError naming `where` and what was expected."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        return _typed(value, hint, where)
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{where} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ValueError(f"{where} must be a list, got {value!r} ({type(value).__name__})")
        return [_typed(item, args[0] if args else Any, f"{where}[{i}]") for i, item in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {value!r} ({type(value).__name__})")
        return value
    if hint in (int, float):
        # YAML reads `1e-3` (no dot) as a string; argparse would convert that string, so do the same.
        if isinstance(value, str):
            try:
                value = hint(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int if hint is int else (int, float)):
            kind = "an integer" if hint is int else "a number"
            raise ValueError(f"{where} must be {kind}, got {value!r} ({type(value).__name__})")
        return hint(value)
    if hint is str and not isinstance(value, str):
        raise ValueError(f"{where} must be a string, got {value!r} ({type(value).__name__}); quote it")
    return value


# Bad input (a missing or malformed file, a flag out of range, a run folder that holds another
# run: `ValueError` and the package's `DataError`s), what the system or the Hub refuses
# (`OSError`, which the Hub client's `HfHubHTTPError` is) and a server that cannot be reached
# (the Hub client's transport errors).
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, httpx2.TransportError)
_OWN_MODULES = {"builtins", "modeling_minigpt", "tokenization", "training"}
# What to do about an error of the file system, by errno.
_OS_ADVICE = {
    errno.ENOSPC: "free some space or choose a folder on another disk",
    errno.EDQUOT: "free some space or choose a folder on another disk",
    errno.EROFS: "choose a folder on a writable file system",
    errno.EACCES: "check the permissions, or choose another folder",
    errno.EPERM: "check the permissions, or choose another folder",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "give a file, not a folder",
    errno.ENOENT: "check the path",
    errno.EEXIST: "a file is in the way where a folder is needed: move it, or choose another path",
}


def describe_error(error: BaseException) -> str:
    """The one line a user reads for `error` (without the "error: " prefix)."""
    # Imported here: the package's import loads torch and registers MiniGPT with the Auto classes,
    # which a --help, or a process that means to load a folder's own code, must not pay for.
    from modeling_minigpt.files import WriteError

    if isinstance(error, httpx2.TransportError):
        try:
            where = f" {error.request.url}"
        except RuntimeError:  # raised before a request was attached
            where = ""
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        return f"cannot reach{where} ({type(error).__name__}: {error}): check the network and HF_ENDPOINT ({endpoint})"
    if isinstance(error, WriteError):
        return f"{error} ({_OS_ADVICE.get(error.errno, error.detail)})"
    if type(error).__module__ == "builtins" and isinstance(error, OSError) and error.strerror:
        # Python's own OSError: "[Errno 13] Permission denied: 'x'" -> "permission denied: x (advice)".
        where = f": {error.filename}" if error.filename else ""
        advice = f" ({_OS_ADVICE[error.errno]})" if error.errno in _OS_ADVICE else ""
        return f"{error.strerror[0].lower()}{error.strerror[1:]}{where}{advice}"
    own = type(error).__module__.split(".")[0] in _OWN_MODULES
    return f"{'' if own else type(error).__name__ + ': '}{error}"


def report_error(error: BaseException) -> int:
    """Print `error` as `error: <message>` on stderr and return the exit code, 1.

    A library's own exception class is named in front of its message (`RepositoryNotFoundError:
    404 Client Error...`), since the message alone often does not say it; Python's and this
    project's exceptions speak for themselves; errors of the file system get what to do.
    """
    print(f"error: {describe_error(error)}", file=sys.stderr)
    return 1
