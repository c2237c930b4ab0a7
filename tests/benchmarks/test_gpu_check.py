"""benchmarks/gpu_check.py: the prepared GPU check runs in its CPU dry run (so it cannot rot between
GPU sessions), every correctness row it can run on a CPU passes, and without a GPU it says so in one line."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.runs import load_script


@pytest.fixture(scope="module")
def gpu_check():
    return load_script("gpu_check", folder="benchmarks")


@pytest.mark.slow
def test_dry_run_prints_one_table_and_passes_its_cpu_rows(gpu_check, tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert gpu_check.main(["--dry_run", "--output_json", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = json.loads(out.read_text())
    assert printed.count("| correctness |") == sum(r["section"] == "correctness" for r in rows) >= 5
    ran = {r["check"]: r for r in rows if r["section"] == "correctness" and r["value"] != "skipped"}
    assert any("logits" in check for check in ran) and any("resumes" in check for check in ran)
    assert all(r["result"] == "ok" for r in ran.values()), ran
    ratios = [r for r in rows if r["check"].startswith("MiniGPT / GPT2LMHeadModel")]
    assert len(ratios) == 3  # training, generation at two batch sizes
    assert all("identical" in r["reference"] for r in ratios if r["section"] == "generation")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible: the check would run")
def test_without_a_gpu_it_asks_for_dry_run(gpu_check, capsys):
    assert gpu_check.main([]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: no CUDA GPU") and "--dry_run" in err
