"""benchmarks/bench_sft.py at its smallest: a saved tiny base, two SFT runs of two steps (real
scripts/sft.py processes), the before/after table and its JSON."""

from __future__ import annotations

import json

import pytest
from helpers.runs import load_script, save_tiny_base


@pytest.mark.slow
def test_smallest_run_fine_tunes_twice_from_the_same_base(tiny_tokenizer, tmp_path, capsys):
    base = save_tiny_base(tmp_path / "base", tiny_tokenizer)
    config = tmp_path / "sft.yaml"
    config.write_text(
        "num_train_tasks: 64\nmax_new_tokens: 4\neval_generations: 2\nper_device_batch_size: 4\n"
        "log_every: 1\neval_every: 100\nsave_every: 100\nreport_to: none\n"
    )
    argv = ["--base_model", str(base), "--sft_config", str(config), "--work_dir", str(tmp_path / "work")]
    argv += ["--sft_steps", "2", "--num_heldout_tasks", "4"]
    assert load_script("bench_sft", "benchmarks").main(argv) == 0
    out = capsys.readouterr().out
    assert "| metric | untuned base | SFT, loss on response only | SFT, loss on all tokens |" in out
    summary = json.loads((tmp_path / "work" / "bench_sft.json").read_text())
    assert summary["masked"]["before"] == summary["unmasked"]["before"]  # one base, one held-out set
    assert summary["masked"]["steps"] == summary["unmasked"]["steps"] == 2 and summary["heldout_records"] == 4
