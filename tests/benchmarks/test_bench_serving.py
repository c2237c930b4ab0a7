"""benchmarks/bench_serving.py: bad settings refused in one line; its smallest run prints every path with the
loop's ids."""

from __future__ import annotations

import pytest
from helpers.runs import load_script


@pytest.fixture(scope="module")
def bench_serving():
    return load_script("bench_serving", "benchmarks")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--preset", "huge"], "--preset must be one of tiny, gpt2-small"),
        (["--requests", "0"], "--requests must be >= 1, got 0"),
        (["--min_prompt", "20", "--max_prompt", "10"], "--max_prompt (10) must be >= --min_prompt (20)"),
        (["--preset", "tiny", "--max_prompt", "120", "--new_tokens", "16"], "tiny's context_length of 128"),
        (["--attn_implementation", "flash"], "--attn_implementation must be sdpa or eager"),
    ],
)
def test_bad_settings_end_with_one_error_line(bench_serving, capsys, args: list[str], message: str) -> None:
    assert bench_serving.main(args) == 1
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: ") and message in captured.err
    assert "benchmark with" not in captured.out


def test_smallest_run_reports_each_path_with_the_loops_ids(bench_serving, capsys) -> None:
    args = "--preset tiny --requests 3 --min_prompt 2 --max_prompt 9 --new_tokens 3 --max_batch_tokens 8"
    assert bench_serving.main([*args.split(), "--repeats", "1", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    for path in bench_serving.PATHS:
        assert path in out
    assert out.count("3/3") == len(bench_serving.PATHS)
