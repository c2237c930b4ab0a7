"""What every script shares: typed dataclasses from a YAML file and flags, and one way to fail.

Every script has one shape: argument dataclasses -> `main(argv) -> int` -> one library call,
with bad input reported as one `error: ...` line on stderr and exit code 1, never a traceback
(`USER_ERRORS`, `report_error`). Kept free of heavy imports (no peft, no datasets).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser


def parse_config_args(
    argument_classes: Sequence[type], argv: Sequence[str] | None, description: str | None = None
) -> tuple[Any, ...]:
    """Typed dataclasses from CLI flags, optionally after a leading YAML/JSON file of defaults.

    `script.py run.yaml --max_steps 10`: the file's keys must be flags of `argument_classes`
    (ValueError listing the unknown ones otherwise); flags after it override it.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = HfArgumentParser(argument_classes, description=description)
    if argv and Path(argv[0]).suffix in {".yaml", ".yml", ".json"}:
        path = Path(argv[0])
        if not path.is_file():
            raise ValueError(f"config file {path} not found")
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"{path} is not valid YAML: {error}") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path} must hold a mapping of flag names to values, got {type(values).__name__}")
        unknown = sorted(set(values) - {f.name for cls in argument_classes for f in fields(cls)})
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown}; run with --help for the accepted flags")
        parser.set_defaults(**values)
        argv = argv[1:]
    return tuple(parser.parse_args_into_dataclasses(args=argv))


# Bad input (a missing or malformed file, a flag out of range, a run folder that holds another
# run: `ValueError` and the package's `DataError`s), and what the system or the Hub refuses
# (`OSError`, which the Hub client's `HfHubHTTPError` is).
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)
_OWN_MODULES = {"builtins", "modeling_minigpt", "tokenization", "training"}


def report_error(error: BaseException) -> int:
    """Print `error` as `error: <message>` on stderr and return the exit code, 1.

    A library's own exception class is named in front of its message (`RepositoryNotFoundError:
    404 Client Error...`), since the message alone often does not say it; Python's and this
    project's exceptions speak for themselves.
    """
    own = type(error).__module__.split(".")[0] in _OWN_MODULES
    print(f"error: {'' if own else type(error).__name__ + ': '}{error}", file=sys.stderr)
    return 1
