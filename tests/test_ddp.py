"""Two CPU processes (gloo DDP through `accelerate launch`) against one process at the same global batch.

Launch as in HF_V5_NOTES: `--cpu --num_processes 2` silently runs one process, so the test uses
ACCELERATE_USE_CPU=1 with --multi_gpu, and checks that two ranks really ran.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers.processes import SUBPROCESS_ENV, two_cpu_processes
from helpers.runs import PRETRAIN_SCRIPT, read_metrics, script_flags

STEPS = 20
# Same global batch: 1 process x 8 windows = 2 processes x 4 windows. The seedable sampler gives
# both the same shuffled order, and rank r takes every other batch of 4 of it, so a step sees
# the same 8 windows either way. Dropout off: its masks come from per-rank RNG streams.
COMMON = dict(max_steps=STEPS, drop_rate=0.0, eval_every=10, save_every=10, keep_last=2, eval_batches=100)


def _run(command: list[str], log: Path) -> str:
    result = subprocess.run(
        command, capture_output=True, text=True, env={**SUBPROCESS_ENV, "ACCELERATE_USE_CPU": "1"}, timeout=900
    )
    log.write_text(result.stdout + result.stderr)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result.stdout + result.stderr


def _files(output_dir: Path) -> list[str]:
    """Relative paths, with the TensorBoard event files' host/pid/time names made comparable."""
    names = []
    for path in sorted(output_dir.rglob("*")):
        if path.is_file():
            parts = path.relative_to(output_dir).parts
            if parts[0] == "logs":
                parts = ("logs", "events" if path.name.startswith("events.out.tfevents") else path.name)
            names.append("/".join(parts))
    return sorted(names)


@pytest.fixture(scope="module")
def runs(corpus_file, tokenizer_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    one, two = root / "one", root / "two"
    flags = dict(corpus=corpus_file, tokenizer=tokenizer_dir, cache=root / "cache", **COMMON)
    _run([sys.executable, str(PRETRAIN_SCRIPT), *script_flags(one, per_device_batch_size=8, **flags)], root / "one.log")
    output = _run(
        two_cpu_processes(PRETRAIN_SCRIPT, *script_flags(two, per_device_batch_size=4, **flags)), root / "two.log"
    )
    return one, two, output


@pytest.mark.slow
def test_two_processes_follow_the_one_process_loss_curve(runs):
    one, two, output = runs
    assert '"num_processes": 2' in (two / "checkpoints" / f"step_{STEPS}" / "checkpoint_complete.json").read_text()
    assert "processes: 2;" in output
    curve = lambda out: [(r["step"], r["tokens"], r["train_loss"]) for r in read_metrics(out) if "train_loss" in r]  # noqa: E731
    single, double = curve(one), curve(two)
    assert [s for s, _, _ in double] == list(range(1, STEPS + 1))
    assert [t for _, t, _ in double] == [t for _, t, _ in single]  # tokens count both ranks
    # The two runs compute the same mathematical gradient; only fp32 summation order differs
    # (one mean over 8 windows vs the all-reduced mean of two means over 4): measured, the
    # losses differ by at most ~1e-6 (a few float32 ulps at 6.0) over 20 steps. 1e-4 leaves
    # room for that to grow on another machine while staying far below what a real mistake
    # does: the loss moves by ~3e-2 per step here, so a rank training on other windows, or
    # gradients summed instead of averaged, shows up at once.
    differences = [abs(a - b) for (_, _, a), (_, _, b) in zip(single, double, strict=False)]
    assert max(differences) < 1e-4, differences
    val = lambda out: [r["val_loss"] for r in read_metrics(out) if "val_loss" in r]  # noqa: E731
    assert val(two) == pytest.approx(val(one), abs=1e-4)


@pytest.mark.slow
def test_only_rank_zero_writes(runs):
    one, two, output = runs
    # Same files as the single-process run; the one addition is rank 1's own RNG state inside
    # each checkpoint (needed to resume it). Two writers would show up as doubled log lines,
    # a second TensorBoard event file, or a second final model.
    extra = sorted(set(_files(two)) - set(_files(one)))
    assert extra == [f"checkpoints/step_{s}/rng_rank1.safetensors" for s in (10, STEPS)]
    assert set(_files(one)) <= set(_files(two))
    assert _files(two).count("logs/events") == _files(one).count("logs/events")
    steps = [r["step"] for r in read_metrics(two) if "train_loss" in r]
    assert steps == sorted(set(steps))
    assert output.count("resolved configuration:") == 1
