"""training/run/accelerator.py: --compile trains the same model as eager, and resumes exactly.

(The precision and attention choices are tested in test_loop.py, with the loop they feed.)
"""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers.runs import logged_losses, tiny_args
from safetensors.torch import load_file

from training.jobs.pretrain import run_pretraining
from training.run.checkpoint import list_checkpoints

# Inductor fuses and reorders fp32 arithmetic (fused softmax, layer norm, AdamW-free forward and
# backward kernels): measured 6 steps of the tiny run differ from eager by at most ~1e-6 in loss.
COMPILED_LOSS_TOLERANCE = 1e-4

STEPS = dict(max_steps=6, save_every=3, eval_every=100, warmup_steps=2, drop_rate=0.0, report_to="none")


@pytest.fixture(scope="module")
def compiled_and_eager(corpus_file, tokenizer_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    runs = {}
    for compiled in (False, True):
        out = tmp_path_factory.mktemp("run") / ("compiled" if compiled else "eager")
        run_pretraining(*tiny_args(out, corpus_file, tokenizer_dir, cache, compile=compiled, **STEPS))
        runs[compiled] = out
    return runs


@pytest.mark.slow
def test_compiled_training_follows_eager_losses(compiled_and_eager, capsys):
    eager, compiled = (logged_losses(compiled_and_eager[c]) for c in (False, True))
    assert [step for step, _, _ in compiled] == [step for step, _, _ in eager] == list(range(1, 7))
    assert [lr for _, _, lr in compiled] == [lr for _, _, lr in eager]
    difference = max(abs(a - b) for (_, a, _), (_, b, _) in zip(compiled, eager, strict=True))
    assert difference < COMPILED_LOSS_TOLERANCE, difference
    # the saved folder is the plain model: same tensor names as eager's, no compile wrapper prefix
    names = set(load_file(compiled_and_eager[True] / "model" / "model.safetensors"))
    assert names == set(load_file(compiled_and_eager[False] / "model" / "model.safetensors"))
    assert not any("_orig_mod" in name for name in names)


@pytest.mark.slow
def test_compiled_run_resumes_bit_exactly(compiled_and_eager, corpus_file, tokenizer_dir, tmp_path, capsys):
    """Cut the compiled run back to its step-3 checkpoint and resume it compiled: same losses and
    the same final weights, bit for bit."""
    full = compiled_and_eager[True]
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    for step, folder in list_checkpoints(cut / "checkpoints"):
        if step > 3:
            shutil.rmtree(folder)
    shutil.rmtree(cut / "model")
    run_pretraining(*tiny_args(cut, corpus_file, tokenizer_dir, tmp_path / "cache", compile=True, resume=True, **STEPS))
    assert "compile: torch.compile" in capsys.readouterr().out
    assert logged_losses(cut) == logged_losses(full)
    resumed, uninterrupted = (load_file(f / "model" / "model.safetensors") for f in (cut, full))
    assert all(torch.equal(resumed[name], uninterrupted[name]) for name in uninterrupted)
