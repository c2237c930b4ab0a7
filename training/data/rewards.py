"""Reward functions for GRPO (`training.jobs.grpo`): plain Python, scored on decoded completions.

A reward function takes a batch of completions and returns one number per completion, in
TRL's convention (so a reward function written for TRL's `GRPOTrainer` works here unchanged):

    def my_reward(completions: list[str], **kwargs) -> list[float]: ...

`kwargs` holds `prompts` (the prompt texts), `completion_ids` (token ids, up to and including
the eos when there is one), `stopped` (True where the completion ended with the eos rather than
at --max_completion_length), and every field of the records, one list each: `instruction`,
`input`, `output` (the expected answer) and, for the embedded tasks, `kind`. Accept `**kwargs`
to ignore what you do not read. Return floats (or ints or bools); None is not accepted.

Built in (`--reward_functions NAME ...`, weights in `--reward_weights`):
- `exact_match`: 1 when the answer equals `output` (`training.evaluation.metrics.exact_match`: surrounding
  whitespace forgiven), else 0. What the held-out evaluation counts.
- `partial_match`: character overlap with `output`, in [0, 1] (difflib's ratio: 2 x matching
  characters / total characters; 1 only for the exact answer). Partial credit, e.g. for a reverse
  with two words swapped, so a group whose answers are all wrong can still tell better from worse.
- `format`: 1 when the completion stopped with the eos and is one non-empty line (no extra
  text after the answer), else 0.

Your own: `--reward_functions my_package.rewards:my_reward` (a module importable from the
working directory or PYTHONPATH, a colon, the function's name). It is called once on a probe
batch before anything is written, so a missing module, a function that raises or one that
returns the wrong thing is reported as one line.
"""

from __future__ import annotations

import difflib
import importlib
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.evaluation.metrics import exact_match

RewardFn = Callable[..., Sequence[float]]


class RewardError(ValueError):
    """A reward function that cannot be found, raises, or returns something else than one number
    per completion."""


def exact_match_reward(completions: Sequence[str], output: Sequence[str], **kwargs: Any) -> list[float]:
    """1.0 where the completion is the expected answer, else 0.0."""
    return [float(exact_match(c, o)) for c, o in zip(completions, output, strict=True)]


def partial_match_reward(completions: Sequence[str], output: Sequence[str], **kwargs: Any) -> list[float]:
    """Character overlap of completion and expected answer (ends stripped), in [0, 1]."""
    return [
        difflib.SequenceMatcher(None, c.strip(), o.strip(), autojunk=False).ratio()
        for c, o in zip(completions, output, strict=True)
    ]


def format_reward(completions: Sequence[str], stopped: Sequence[bool], **kwargs: Any) -> list[float]:
    """1.0 where the completion ended with the eos and is a single non-empty line."""
    return [float(s and bool(c.strip()) and "\n" not in c.strip()) for c, s in zip(completions, stopped, strict=True)]


BUILT_IN: dict[str, RewardFn] = {
    "exact_match": exact_match_reward,
    "partial_match": partial_match_reward,
    "format": format_reward,
}


def load_reward_function(spec: str) -> RewardFn:
    """A built-in reward by name, or `module.path:function` imported (the working directory first
    on the path, as `python -m` would have it)."""
    if spec in BUILT_IN:
        return BUILT_IN[spec]
    if ":" not in spec:
        raise RewardError(
            f"unknown reward function {spec!r}: give a built-in one ({', '.join(BUILT_IN)}) "
            "or module.path:function for your own"
        )
    module_name, _, name = spec.partition(":")
    cwd = str(Path.cwd())
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise RewardError(f"reward function {spec!r}: no module named {error.name!r} (from {cwd})") from None
    except Exception as error:  # the module itself fails to import: its error, in one line
        raise RewardError(f"reward function {spec!r}: importing {module_name} failed: {error!r}") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise RewardError(f"reward function {spec!r}: {module_name} has no function {name!r}")
    return function


@dataclass
class Rewards:
    """The weighted sum of the reward functions (TRL's `reward_weights`): one number per completion,
    and each function's own numbers for the log."""

    names: list[str]
    functions: list[RewardFn]
    weights: list[float]

    @classmethod
    def load(cls, specs: Sequence[str], weights: Sequence[float] | None) -> Rewards:
        if not specs:
            raise RewardError("--reward_functions is empty: name at least one")
        if weights is not None and len(weights) != len(specs):
            raise RewardError(f"{len(weights)} --reward_weights for {len(specs)} --reward_functions")
        return cls(list(specs), [load_reward_function(s) for s in specs], list(weights or [1.0] * len(specs)))

    def score(
        self,
        completions: Sequence[str],
        records: Sequence[Mapping[str, Any]],
        **context: Sequence[Any],
    ) -> tuple[list[float], dict[str, list[float]]]:
        """(the weighted sum per completion, {name: that function's rewards}). `context`: prompts,
        completion_ids, stopped. RewardError naming the function if one raises or returns badly."""
        columns = {key: [r.get(key) for r in records] for key in records[0]} if records else {}
        kwargs = {**columns, **context}
        each = {}
        for name, function in zip(self.names, self.functions, strict=True):
            try:
                values = function(completions=list(completions), **kwargs)
            except Exception as error:
                raise RewardError(f"reward function {name!r} raised {error!r}") from None
            each[name] = _checked(name, values, len(completions))
        total = [
            sum(w * each[n][i] for n, w in zip(self.names, self.weights, strict=True)) for i in range(len(completions))
        ]
        return total, each


def _checked(name: str, values: Any, n: int) -> list[float]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise RewardError(f"reward function {name!r} returned {type(values).__name__}, not a list of {n} numbers")
    if len(values) != n:
        raise RewardError(f"reward function {name!r} returned {len(values)} values for {n} completions")
    bad = [v for v in values if isinstance(v, bool) is False and not isinstance(v, (int, float))]
    if bad:
        raise RewardError(f"reward function {name!r} returned {bad[0]!r}, not a number")
    floats = [float(v) for v in values]
    if not all(math.isfinite(v) for v in floats):
        raise RewardError(f"reward function {name!r} returned a non-finite value: {floats}")
    return floats
