"""Command-line parsing shared by every script: typed dataclasses, a YAML file, flag overrides.

Kept free of heavy imports (no peft, no datasets) so `--help` answers quickly.
"""

from __future__ import annotations

import sys
from dataclasses import fields
from pathlib import Path
from typing import Any, Sequence

import yaml
from transformers import HfArgumentParser


def parse_config_args(argument_classes: Sequence[type], argv: Sequence[str] | None, description: str | None = None) -> tuple[Any, ...]:
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
