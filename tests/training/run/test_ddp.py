"""Two CPU processes (gloo DDP through `accelerate launch`) against one process at the same global batch.

Launch as in HF_V5_NOTES: `--cpu --num_processes 2` silently runs one process, so the test uses
ACCELERATE_USE_CPU=1 with --multi_gpu, and checks that two ranks really ran.
"""

from __future__ import annotations

import functools
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from helpers.processes import SUBPROCESS_ENV, run_checked, two_cpu_processes
from helpers.runs import PRETRAIN_SCRIPT, read_metrics, run_and_resume, script_flags
from safetensors.torch import load_file

from modeling_minigpt import MiniGPTForCausalLM

STEPS = 20
# Same global batch: 1 process x 8 windows = 2 processes x 4 windows. The seedable sampler gives
# both the same shuffled order, and rank r takes every other batch of 4 of it, so a step sees
# the same 8 windows either way. Dropout off: its masks come from per-rank RNG streams.
# The sharded run against the one process, after 20 steps: measured here, the logits differ by
# 1.3e-6 (on logits up to 1.4; the losses by 9.5e-7), float32 rounding of a reduce-scatter of two
# half-batch gradients instead of one mean. 1e-4 leaves ~75x room and is far below a real
# mistake: the trained logits are 1.7 away from untrained ones.
LOGIT_TOLERANCE = 1e-4
COMMON = dict(max_steps=STEPS, drop_rate=0.0, eval_every=10, save_every=10, keep_last=2, eval_batches=100)


# Accelerate's CPU "multi-GPU" launch needs this in the environment of every process.
CPU_ENV = {**SUBPROCESS_ENV, "ACCELERATE_USE_CPU": "1"}


def _run(command: list[str], log: Path) -> str:
    return run_checked(command, log, CPU_ENV)


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


# ----------------------------------------------------------------------------- a streamed corpus

# 12k characters give ~160 windows: ~20 steps of 8 per epoch on one process and as many of 4 per
# rank on two (each rank's share is every other window of the one shuffled order, cut to whole
# batches: floor(floor(n / 2) / 4) = floor(n / 8)), so 24 steps cross an epoch boundary.
STREAM_STEPS = 24
POSITION = r"all (\d+) process\(es\) stopped at step (\d+), epoch (\d+) \+ (\d+) batches"


@pytest.fixture(scope="module")
def streamed_runs(corpus_file, tokenizer_dir, pydoc_text, tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp_stream")
    validation = root / "validation.txt"
    validation.write_text(pydoc_text[12_000:14_000], encoding="utf-8")
    one, two = root / "one", root / "two"
    flags = dict(
        COMMON,
        corpus=corpus_file,
        tokenizer=tokenizer_dir,
        cache=root / "cache",
        streaming=True,
        validation_file=validation,
        max_steps=STREAM_STEPS,
        eval_every=STREAM_STEPS,
        save_every=STREAM_STEPS,
    )
    out_one = _run(
        [sys.executable, str(PRETRAIN_SCRIPT), *script_flags(one, per_device_batch_size=8, **flags)], root / "one.log"
    )
    out_two = _run(
        two_cpu_processes(PRETRAIN_SCRIPT, *script_flags(two, per_device_batch_size=4, **flags)), root / "two.log"
    )
    return one, two, out_one, out_two


@pytest.mark.slow
def test_two_processes_stream_their_shares_in_the_one_process_order(streamed_runs):
    one, two, out_one, out_two = streamed_runs
    assert "processes: 2; training: windows streamed" in out_two
    # Both ranks stopped at the same place in the data (the job checks it), the one process's
    # place, past the end of the first epoch.
    [(processes, step, epoch, batches)] = re.findall(POSITION, out_two)
    assert (processes, step, epoch) == ("2", str(STREAM_STEPS), "1") and int(batches) > 0
    assert re.findall(POSITION, out_one) == [("1", step, epoch, batches)]
    curve = lambda out: [(r["step"], r["tokens"], r["train_loss"]) for r in read_metrics(out) if "train_loss" in r]  # noqa: E731
    single, double = curve(one), curve(two)
    assert [s for s, _, _ in double] == list(range(1, STREAM_STEPS + 1))
    assert [t for _, t, _ in double] == [t for _, t, _ in single]
    # The same 8 windows per step (tolerance as in the test above), also after the epoch boundary,
    # where a different cut of the shares or another shuffle would move the loss by ~1e-2.
    differences = [abs(a - b) for (_, _, a), (_, _, b) in zip(single, double, strict=True)]
    assert max(differences) < 1e-4, differences


# ----------------------------------------------------------------------------- a sharded model (FSDP2)


@pytest.fixture(scope="module")
def sharded_runs(runs, corpus_file, tokenizer_dir, tmp_path_factory):
    """The run of `runs` again on two processes with the model sharded (--fsdp), and a copy of
    it cut back to its step-10 checkpoint (as if killed after it) and resumed."""
    one, _, _ = runs
    root = tmp_path_factory.mktemp("fsdp")
    flags = dict(corpus=corpus_file, tokenizer=tokenizer_dir, cache=root / "cache", **COMMON, fsdp=True)
    sharded, resumed, output, resumed_output = run_and_resume(
        functools.partial(two_cpu_processes, PRETRAIN_SCRIPT), root, STEPS, CPU_ENV, per_device_batch_size=4, **flags
    )
    return one, sharded, resumed, output, resumed_output


@pytest.mark.slow
def test_a_sharded_run_follows_the_one_process_run_and_saves_the_whole_model(sharded_runs):
    one, sharded, _, output, _ = sharded_runs
    assert "processes: 2 (model sharded, FSDP2)" in output
    curve = lambda out: [r["train_loss"] for r in read_metrics(out) if "train_loss" in r]  # noqa: E731
    # Same 8 windows per step as the one process; tolerance as for DDP above.
    assert curve(sharded) == pytest.approx(curve(one), abs=1e-4)
    # The final folder is a plain MiniGPT gathered on rank 0: it loads like the one-process folder
    # and gives its logits.
    plain, gathered = (MiniGPTForCausalLM.from_pretrained(out / "model").eval() for out in (one, sharded))
    assert json.loads((sharded / "model" / "config.json").read_text())["architectures"] == ["MiniGPTForCausalLM"]
    assert gathered.lm_head.weight.data_ptr() == gathered.model.tok_emb.weight.data_ptr()
    ids = torch.randint(0, plain.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            gathered(input_ids=ids).logits, plain(input_ids=ids).logits, atol=LOGIT_TOLERANCE, rtol=0
        )


@pytest.mark.slow
def test_a_sharded_run_resumes_from_its_checkpoint(sharded_runs):
    _, sharded, resumed, _, resumed_output = sharded_runs
    assert "resuming from step 10" in resumed_output
    # The checkpoint holds the whole model and optimizer state (gathered to rank 0), which both
    # ranks load and re-shard: the resumed run repeats the uninterrupted one.
    entries = lambda out: [(r["step"], r["train_loss"]) for r in read_metrics(out) if "train_loss" in r]  # noqa: E731
    assert entries(resumed) == entries(sharded)
    weights = [load_file(out / "model" / "model.safetensors") for out in (sharded, resumed)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
