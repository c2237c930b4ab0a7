"""What every benchmark shares: its arguments, the state of the machine, and timing ours against a reference.

A benchmark has the shape of an entry point in scripts/: `python benchmarks/bench_X.py [run.yaml]
[--flags]`, run after the project's install (the packages are found through it, never through a
path set here; this module is found beside the script, as Python finds a script's neighbours),
typed argument dataclasses read by `training.cli.parse_config_args` (--help with units and
defaults, snake_case flags, a YAML file of defaults), and a bad value refused in one
`error: ...` line (`training.cli.report_error`) before anything is built or timed.

Every figure a benchmark prints is a ratio against a reference measured in the same process. The
two sides run in turn (`interleaved`), so load from other processes, which drifts over minutes,
slows both alike, and a ratio is the median over repetitions of the ratio within one repetition
(`median_ratio`). The load average is printed with the results (`load_average`): on a busy
machine, read the ratios, not the absolute rates.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
# The workplace's data folder beside the checkout: tinyshakespeare.txt and GPT-2's gpt2/ files.
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def threads_field() -> Any:
    """The `--threads` flag of the benchmarks that time torch: torch's default unless given."""
    return field(
        default=None,
        metadata={"help": "torch.set_num_threads (default: torch's). 1 gives steadier ratios on a busy machine."},
    )


def set_threads(threads: int | None) -> None:
    """Apply a `--threads` flag (None leaves torch's default)."""
    if threads is not None:
        torch.set_num_threads(threads)


def check_at_least(arguments: Any, minimum: int, *names: str) -> None:
    """ValueError naming the first flag of `names` below `minimum` (every item, for a list; None is unset)."""
    for name in names:
        value = getattr(arguments, name)
        values = value if isinstance(value, (list, tuple)) else [value]
        if any(v is not None and v < minimum for v in values):
            raise ValueError(f"--{name} must be >= {minimum}, got {value}")


def check_data_dir(data_dir: str | os.PathLike[str], *names: str) -> None:
    """ValueError unless `data_dir` holds every file or folder of `names`."""
    missing = [name for name in names if not (Path(data_dir) / name).exists()]
    if missing:
        raise ValueError(f"--data_dir {data_dir} holds no {' or '.join(missing)}")


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, e.g. '1.92 1.40 1.05'."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


class Timed(NamedTuple):
    """What one call returned, and the wall-clock and process CPU seconds (all threads) it took."""

    result: Any
    wall: float
    cpu: float


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Timed:
    """Call `fn(*args, **kwargs)` once and time it."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(*args, **kwargs)
    return Timed(result, time.perf_counter() - wall, time.process_time() - cpu)


@dataclass
class Timings:
    """Wall-clock and process CPU seconds of each timed run, per name, and each name's last result."""

    wall: dict[str, list[float]]
    cpu: dict[str, list[float]]
    results: dict[str, Any]


def interleaved(runs: dict[str, Callable[[], object]], repeats: int, warmup: int, show: bool = True) -> Timings:
    """Call each of `runs` once per repetition, in turn, `warmup + repeats` times; the warm-up
    repetitions are not kept. `show` prints each repetition's times."""
    timings = Timings({name: [] for name in runs}, {name: [] for name in runs}, {})
    for repetition in range(warmup + repeats):
        line = []
        for name, run in runs.items():
            took = timed(run)
            timings.results[name] = took.result
            line.append(f"{name} {took.wall:.2f}s")
            if repetition >= warmup:
                timings.wall[name].append(took.wall)
                timings.cpu[name].append(took.cpu)
        if show:
            label = "warm-up" if repetition < warmup else f"{repetition + 1 - warmup}/{repeats}"
            print(f"  [{label}] " + ", ".join(line), flush=True)
    return timings


def median_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> float:
    """The median over repetitions of numerator / denominator within each repetition: with the
    reference's seconds as numerators, how many times faster the other side is."""
    return statistics.median(a / b for a, b in zip(numerators, denominators, strict=True))
