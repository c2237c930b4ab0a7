"""Faults mid-run, for real: a pretraining process SIGKILLed at a chosen moment of a write (the
final save, an --overwrite moving the old run aside, the moment after the new run's first
checkpoint), then the next run on the folder. The kill comes from inside the process: a small
driver wraps one library function so that it SIGKILLs its own process at that call, then runs
scripts/pretrain.py as `python scripts/pretrain.py` would. Also in-process: checkpoints damaged
on disk are skipped for the previous complete one, a stale lock is taken over.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.processes import killed_in
from helpers.runs import PRETRAIN_SCRIPT, listing, logged_losses, read_metrics, script_flags, tiny_args
from safetensors.torch import load_file

from training.jobs.pretrain import run_pretraining
from training.run.checkpoint import list_checkpoints

RUN = dict(max_steps=6, save_every=3, eval_every=6, report_to="none")


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model" / "model.safetensors")


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference(corpus_file, tokenizer_dir, tmp_path_factory) -> Path:
    """The same run, never interrupted."""
    out = tmp_path_factory.mktemp("reference") / "out"
    run_pretraining(*tiny_args(out, corpus_file, tokenizer_dir, tmp_path_factory.mktemp("cache"), **RUN))
    return out


def test_killed_during_the_final_save_resumes_to_the_same_model(corpus_file, tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "out"
    flags = script_flags(out, corpus_file, tokenizer_dir, tmp_path / "cache", **RUN)
    # The model folder is fully written into its temporary folder; killed just before the rename.
    killed_in(
        PRETRAIN_SCRIPT, "training.saved.save:replace_dir", "os.path.basename(str(args[1])) == 'model'", flags, tmp_path
    )
    assert not (out / "model").exists() and [s for s, _ in list_checkpoints(out / "checkpoints")] == [3, 6]
    assert (out / "run.lock").is_file()  # left by the killed run

    logged = read_metrics(out)
    run_pretraining(*tiny_args(out, corpus_file, tokenizer_dir, tmp_path / "cache", **RUN, resume=True))
    # Resumed at its last step: no step is trained again, the model saved is the last checkpoint's.
    final, checkpoint = weights(out), load_file(out / "checkpoints" / "step_6" / "model.safetensors")
    shared = final.keys() & checkpoint.keys()  # the checkpoint stores the tied head once
    assert len(shared) == len(final) - 1 and all(torch.equal(final[name], checkpoint[name]) for name in shared)
    assert read_metrics(out) == logged
    assert "taking over the stale lock of a run that is gone" in capsys.readouterr().out
    assert not (out / "run.lock").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporaries of the killed save were left"


def test_killed_while_overwrite_moves_the_old_run_aside_restores_it(corpus_file, tokenizer_dir, tmp_path):
    out = tmp_path / "out"
    run_pretraining(*tiny_args(out, corpus_file, tokenizer_dir, tmp_path / "cache", **RUN))
    before, old_weights, record = listing(out), weights(out), (out / "run_config.json").read_text()
    new = dict(RUN, learning_rate=1e-3)
    flags = script_flags(out, corpus_file, tokenizer_dir, tmp_path / "cache", **new, overwrite=True)
    # Killed while moving the old run's entries into .old-run.moving, two of them moved.
    condition = "'.old-run.moving' in str(args[1]) and len(os.listdir(os.path.dirname(str(args[1])))) >= 2"
    killed_in(PRETRAIN_SCRIPT, "os:replace", condition, flags, tmp_path)
    assert len(list((out / ".old-run.moving").iterdir())) == 2
    # The next run on the folder (here: --resume of the old one) finds the half-done move and undoes it.
    run_pretraining(*tiny_args(out, corpus_file, tokenizer_dir, tmp_path / "cache", **RUN, resume=True))
    # Every file of the old run is back (the resumed finish rewrites its reports, with new timings).
    after = listing(out)
    assert after.keys() == before.keys()
    assert {k: v for k, v in after.items() if k.startswith("checkpoints/")} == {
        k: v for k, v in before.items() if k.startswith("checkpoints/")
    }
    assert (out / "run_config.json").read_text() == record
    assert same(weights(out), old_weights)


def test_killed_after_the_new_runs_first_checkpoint_keeps_the_new_run(corpus_file, tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "out"
    run_pretraining(*tiny_args(out, corpus_file, tokenizer_dir, tmp_path / "cache", **RUN))
    new = dict(RUN, learning_rate=1e-3)
    flags = script_flags(out, corpus_file, tokenizer_dir, tmp_path / "cache", **new, overwrite=True)
    # Killed when the new run, its first checkpoint written, is about to delete the old run.
    killed_in(PRETRAIN_SCRIPT, "training.run.folder:retire_replaced", "True", flags, tmp_path)
    assert (out / ".old-run").is_dir() and [s for s, _ in list_checkpoints(out / "checkpoints")] == [3]

    run_pretraining(*tiny_args(out, corpus_file, tokenizer_dir, tmp_path / "cache", **new, resume=True))
    output = capsys.readouterr().out
    assert "interrupted after the new run's first checkpoint: removed the old run" in output
    assert "resuming from step 3" in output
    assert not (out / ".old-run").exists()
    assert json.loads((out / "run_config.json").read_text())["fingerprint"]["optimization"]["learning_rate"] == 1e-3
    assert [r["step"] for r in read_metrics(out) if "train_loss" in r] == list(range(1, 7))


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(
    reference, corpus_file, tokenizer_dir, tmp_path, capsys
):
    """The last checkpoint's optimizer state is cut short on disk: --resume says so and takes step 3,
    and the run it finishes is still the uninterrupted one (bit-exact from step 3)."""
    out = tmp_path / "out"
    (tmp_path / "cache").mkdir()
    run_pretraining(*tiny_args(out, corpus_file, tokenizer_dir, tmp_path / "cache", **RUN))
    optimizer = out / "checkpoints" / "step_6" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    capsys.readouterr()
    run_pretraining(*tiny_args(out, corpus_file, tokenizer_dir, tmp_path / "cache", **RUN, resume=True))
    output = capsys.readouterr().out
    assert "skipping checkpoint step_6" in output and "optimizer.pt is damaged" in output
    assert "resuming from the previous complete checkpoint, step_3" in output
    assert same(weights(out), weights(reference))
    assert logged_losses(out) == logged_losses(reference)
