"""benchmarks/bench_data.py at its smallest: tinyshakespeare once, one repetition; its own checks
(our tokens are tiktoken's, our windows the book's) pass, and the ratios are printed."""

from __future__ import annotations

from helpers.runs import load_script


def test_smallest_run_checks_against_the_book_and_prints_the_ratios(shared_data, capsys):
    argv = ["--repeat_mb", "0.01", "--repeats", "1", "--data_dir", str(shared_data)]
    assert load_script("bench_data", "benchmarks").main(argv) == 0  # it asserts tokens and windows equal the book's
    out = capsys.readouterr().out
    assert "corpus: tinyshakespeare x 1" in out
    for line in ("windowing, ours / book loop:", "end to end, ours / book:", "tokenizing, ours / tiktoken:"):
        assert line in out
