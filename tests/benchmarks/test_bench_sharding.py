"""benchmarks/bench_sharding.py at its smallest: a 1-block, 32-wide model measured, GPT-2 shapes estimated."""

from __future__ import annotations

import re

from helpers.runs import load_script

TINY = "--layers 1 --emb_dim 32 --vocab 64 --context 16 --batch 2 --pairs 1 --ranks 1 2"


def test_smallest_run_measures_the_adamw_state_the_estimates_assume(capsys):
    assert load_script("bench_sharding", "benchmarks").main(TINY.split()) == 0
    out = capsys.readouterr().out
    # fp32 parameters, gradients and two AdamW moments: 16 bytes/param (plus AdamW's step counters).
    state = float(re.search(r"training state: (\d+\.\d+) bytes/param", out).group(1))
    assert 16.0 <= state < 16.1
    rows = re.findall(r"^(gpt2-small|gpt2-xl)\s+(\d+)M\s+(\d+)", out, re.MULTILINE)
    assert rows == [
        ("gpt2-small", "124", "1"),
        ("gpt2-small", "124", "2"),
        ("gpt2-xl", "1558", "1"),
        ("gpt2-xl", "1558", "2"),
    ]
