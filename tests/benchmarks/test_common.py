"""benchmarks/common.py and the rule every benchmark follows: --help with defaults, a bad value refused
in one `error:` line before anything runs, each listed in the README; timing in turn, ratios of medians."""

from __future__ import annotations

import re

import pytest
from helpers.runs import REPO_ROOT, load_script

BENCHMARKS = sorted(path.stem for path in (REPO_ROOT / "benchmarks").glob("bench_*.py"))
# One bad value per benchmark, and what its error line says.
BAD_VALUES = {
    "bench_data": (["--repeats", "0"], "--repeats must be >= 1, got 0"),
    "bench_loop": (["--emb_dim", "30", "--n_heads", "4"], "--emb_dim must be a multiple of --n_heads"),
    "bench_model": (["--new_tokens", "0"], "--batches and --new_tokens must be >= 1, got [1, 8] and 0"),
    "bench_optimizer": (["--eval_every", "0"], "--eval_every must be >= 1, got 0"),
    "bench_serving": (["--requests", "0"], "--requests must be >= 1, got 0"),
    "bench_sft": (["--base_model", "no/such/folder"], "is not a saved model folder"),
    "bench_sharding": (["--ranks", "1", "0"], "--ranks must be >= 1, got [1, 0]"),
    "bench_tokenizer": (["--vocab_size", "100"], "--vocab_size must be >= 258, got 100"),
}


@pytest.fixture(scope="module")
def common():
    load_script("bench_model", "benchmarks")  # puts benchmarks/common.py where the benchmarks find it
    import common

    return common


def test_every_benchmark_has_a_bad_value_here_and_a_row_in_the_readme():
    assert sorted(BAD_VALUES) == BENCHMARKS
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    benchmarks_section = readme.split("\n## Benchmarks\n")[1].split("\n## ")[0]
    listed = re.findall(r"^\| `benchmarks/(bench_\w+)\.py` \| \S", benchmarks_section, re.MULTILINE)
    assert sorted(listed) == BENCHMARKS


@pytest.mark.parametrize("name", BENCHMARKS)
def test_help_gives_each_flag_with_its_default(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        load_script(name, "benchmarks").main(["--help"])
    assert exit_.value.code == 0
    options = re.split(r"\n  (?=-)", capsys.readouterr().out.split("\noptions:\n")[1])
    flags = {option.split()[0]: " ".join(option.split()) for option in options if option.startswith("--")}
    assert flags and [flag for flag, text in flags.items() if "(default: " not in text] == []


@pytest.mark.parametrize("name", BENCHMARKS)
def test_a_bad_value_is_one_error_line_before_anything_runs(name, capsys):
    argv, message = BAD_VALUES[name]
    assert load_script(name, "benchmarks").main(argv) == 1
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: ") and message in captured.err
    assert captured.out == ""


def test_interleaved_runs_each_side_in_turn_and_drops_the_warm_up(common):
    calls = []
    runs = {"reference": lambda: calls.append("reference") or 1, "ours": lambda: calls.append("ours") or 2}
    timings = common.interleaved(runs, repeats=3, warmup=1, show=False)
    assert calls == ["reference", "ours"] * 4
    assert [len(timings.wall[name]) for name in runs] == [3, 3] and timings.results == {"reference": 1, "ours": 2}
    assert all(seconds >= 0 for name in runs for seconds in timings.wall[name] + timings.cpu[name])


def test_median_ratio_is_the_median_of_ratios_within_a_repetition(common):
    # A machine that gets busier slows both sides: the ratio within each repetition stays 2.
    reference, ours = [2.0, 4.0, 8.0, 20.0], [1.0, 2.0, 4.0, 10.0]
    assert common.median_ratio(reference, ours) == 2.0
    with pytest.raises(ValueError):
        common.median_ratio(reference, ours[:3])


def test_check_at_least_names_the_flag_and_skips_unset_values(common):
    class Arguments:
        pairs, threads, ranks = 2, None, [1, 0]

    common.check_at_least(Arguments, 1, "pairs", "threads")
    with pytest.raises(ValueError, match=r"^--ranks must be >= 1, got \[1, 0\]$"):
        common.check_at_least(Arguments, 1, "pairs", "ranks")
