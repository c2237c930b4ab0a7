"""benchmarks/bench_model.py refuses bad settings with one line before it builds or times anything; its
smallest training run."""

from __future__ import annotations

import pytest
from helpers.runs import load_script


@pytest.fixture(scope="module")
def bench_model():
    return load_script("bench_model", "benchmarks")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--pairs", "0"], "--pairs must be >= 1"),
        (["--threads", "0"], "--threads must be >= 1, got 0"),
        (["--shape", "huge"], "--shape must be one of tiny, quickstart, gpt2-small or all, got 'huge'"),
        (["--generate", "--linear"], "separate benchmarks: give one of them"),
        (["--int8", "--generate"], "separate benchmarks: give one of them"),
        (["--int8", "--gpt2_dir", "no/such/folder"], "--gpt2_dir no/such/folder: no vocab.bpe there"),
    ],
)
def test_bad_settings_end_with_one_error_line(bench_model, capsys, args: list[str], message: str) -> None:
    assert bench_model.main(args) == 1
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: ") and message in captured.err
    assert "benchmark with" not in captured.out  # refused before anything ran


def test_smallest_training_run_starts_every_model_from_the_same_weights(bench_model, capsys):
    assert bench_model.main(["--shape", "quickstart", "--pairs", "1", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert "(ratios vs hf-gpt2-sdpa)" in out
    # Same weights, data and optimizer: MiniGPT (sdpa, eager) and GPT2LMHeadModel start from the same loss.
    losses = out.split("first-step loss: ")[1].splitlines()[0].split(", ")
    assert [loss.split()[0] for loss in losses] == ["minigpt-sdpa", "minigpt-eager", "hf-gpt2-sdpa"]
    assert len({round(float(loss.split()[1]), 4) for loss in losses}) == 1
