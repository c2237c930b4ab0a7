"""benchmarks/bench_optimizer.py at its smallest: two steps of each optimizer, one evaluation."""

from __future__ import annotations

import re

from helpers.runs import load_script


def test_smallest_run_prints_both_curves_and_the_cost_ratio(capsys):
    assert load_script("bench_optimizer", "benchmarks").main(["--steps", "2", "--eval_every", "2"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"cost of a step, Muon / AdamW \(median over 2 rounds\): \d+\.\d{3}x", out)
    assert re.search(r"^\s+2\s+\d+\.\d{3}\s+\d+\.\d{3}$", out, re.MULTILINE)  # step 2: AdamW and Muon bits/byte
    assert "equal time: AdamW" in out
