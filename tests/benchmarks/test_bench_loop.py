"""benchmarks/bench_loop.py at its smallest: one segment of one step per loop, and the overhead line."""

from __future__ import annotations

from helpers.runs import load_script

TINY = "--n_layers 1 --emb_dim 32 --n_heads 2 --context_length 16 --vocab_size 64 --batch_size 2 --accumulation 1"


def test_smallest_run_times_both_loops_and_prints_the_overhead(capsys):
    assert load_script("bench_loop", "benchmarks").main([*TINY.split(), "--steps", "1", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "model 1 x 32, context 16, vocab 64; batch 2 x 1 accumulation" in out
    assert "train_loop overhead vs bare loop:" in out and "(median of 1 paired segments" in out
