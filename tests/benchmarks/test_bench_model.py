"""benchmarks/bench_model.py refuses bad settings with one line before it builds or times anything."""

from __future__ import annotations

import importlib.util
import sys

import pytest
from helpers.runs import REPO_ROOT

SCRIPT = REPO_ROOT / "benchmarks" / "bench_model.py"


@pytest.fixture(scope="module")
def bench_model():
    spec = importlib.util.spec_from_file_location("bench_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_model"] = module  # dataclasses look their module up while it is executing
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules["bench_model"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--pairs", "0"], "--pairs must be >= 1"),
        (["--threads", "0"], "--threads must be >= 1, got 0"),
        (["--shape", "huge"], "--shape must be one of tiny, quickstart, gpt2-small or all, got 'huge'"),
        (["--generate", "--linear"], "separate benchmarks: give one of them"),
        (["--int8", "--generate"], "separate benchmarks: give one of them"),
    ],
)
def test_bad_settings_end_with_one_error_line(bench_model, capsys, args: list[str], message: str) -> None:
    assert bench_model.main(args) == 1
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: ") and message in captured.err
    assert "benchmark with" not in captured.out  # refused before anything ran
