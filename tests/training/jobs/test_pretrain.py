"""training/jobs/pretrain.py and scripts/pretrain.py end to end (tiny model): a whole run, every bad input
stopping before training, and a run killed with SIGKILL resuming bit-exactly. (The time budget is
tested in test_loop.py, on an injected clock: no test depends on the machine's speed.)

The tiny run's settings (`tiny_args`, `script_flags`) are in tests/helpers/runs.py (test_ddp.py uses them too).
"""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import math
import os
import pickletools
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import datasets
import pytest
import torch
from helpers.processes import SUBPROCESS_ENV, killed_before_logging, launch
from helpers.runs import (
    PRETRAIN_SCRIPT,
    card_results,
    listing,
    load_script,
    logged_losses,
    read_metrics,
    script_flags,
    tiny_args,
)
from safetensors import safe_open
from safetensors.torch import load_file

from tokenization.corpus import DataError
from training.data.windows import build_lm_datasets
from training.jobs.pretrain import run_pretraining
from training.run.checkpoint import list_checkpoints
from training.run.lifecycle import RunFolderError

# ----------------------------------------------------------------------------- a whole run


@pytest.fixture(scope="module")
def finished_run(corpus_file, tmp_path_factory):
    """One tiny run that trains its own tokenizer; several tests inspect what it left."""
    out = tmp_path_factory.mktemp("run") / "out"
    args = tiny_args(out, corpus_file, None, tmp_path_factory.mktemp("cache"), max_steps=20)
    return run_pretraining(*args), out


def test_run_learns_and_logs_every_step(finished_run):
    result, out = finished_run
    records = read_metrics(out)
    train = [r for r in records if "train_loss" in r]
    assert [r["step"] for r in train] == list(range(1, 21))
    assert [r["tokens"] for r in train] == [8 * 32 * s for s in range(1, 21)]  # batch x context per step
    assert train[0]["train_loss"] == pytest.approx(math.log(400), abs=0.3)  # starts near uniform over the vocabulary
    assert train[-1]["train_loss"] < train[0]["train_loss"] - 0.5
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [10, 20]
    assert evals[1]["val_loss"] < evals[0]["val_loss"]
    assert all(isinstance(r["sample"], str) and r["sample"] for r in evals)
    # the learning rate follows warmup then cosine decay
    lrs = [r["lr"] for r in train]
    assert lrs[:4] == pytest.approx([3e-3 * k / 4 for k in (1, 2, 3, 4)])
    assert lrs[4] == pytest.approx(3e-3) and lrs[-1] < 5e-4
    assert result.steps == 20 and result.tokens_seen == 20 * 8 * 32
    assert 1.5 < result.chars_per_second / result.tokens_per_second < 3.0  # characters per token of a 400-token BPE


def test_run_outputs(finished_run):
    result, out = finished_run
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((out / "logs").rglob("events.out.tfevents.*")), "no TensorBoard events written"
    assert [step for step, _ in list_checkpoints(out / "checkpoints")] == [15, 20]  # keep_last=2
    assert not list((out / "checkpoints").glob(".tmp-*"))
    saved = json.loads((out / "run_config.json").read_text())
    assert saved["fingerprint"]["model"]["n_layers"] == 2
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["validation"]["bits_per_char"] == pytest.approx(result.report.bits_per_char)
    # The whole held-out text is scored: its characters are exactly the last 10% of the corpus.
    assert final["validation"]["n_chars"] == round(0.1 * 12_000)
    card = (out / "model" / "README.md").read_text()
    assert "loss_curve.png" in card and (out / "model" / "loss_curve.png").is_file()
    report = result.report
    expected = {"loss": report.loss, "perplexity": report.perplexity, "bits_per_byte": report.bits_per_byte}
    assert card_results(out / "model") == expected
    # It says which text, and how it was cut: another stride gives other numbers.
    assert f"windows of {report.context_length} tokens, stride {report.stride}" in card


def test_final_model_loads_with_auto_classes_in_a_fresh_process(finished_run, tmp_path):
    _, out = finished_run
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(out / 'model')!r}, trust_remote_code=True).eval()\n"
        f"tokenizer = AutoTokenizer.from_pretrained({str(out / 'model')!r}, trust_remote_code=True)\n"
        "ids = tokenizer('The return statement', return_tensors='pt').input_ids\n"
        "torch.save({'logits': model(ids).logits, 'vocab': len(tokenizer), 'cls': type(model).__name__}, sys.argv[1])\n"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "out.pt")],
        check=True,
        cwd=tmp_path,
        env=SUBPROCESS_ENV,
        timeout=300,
    )
    loaded = torch.load(tmp_path / "out.pt")
    assert loaded["cls"] == "MiniGPTForCausalLM" and loaded["vocab"] == 400

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "model", trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "model", trust_remote_code=True)
    with torch.no_grad():
        expected = model(tokenizer("The return statement", return_tensors="pt").input_ids).logits
    torch.testing.assert_close(loaded["logits"], expected)


def test_trained_tokenizer_is_saved_with_the_run(finished_run):
    _, out = finished_run
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(out / "tokenizer")
    assert len(saved) == 400
    assert (out / "model" / "tokenizer.json").read_text() == (out / "tokenizer" / "tokenizer.json").read_text()


# ----------------------------------------------------------------------------- bad input: stop before training


def _expect_refusal(args, error: type[Exception], match: str, out: Path) -> None:
    before = listing(out)
    with pytest.raises(error, match=match):
        run_pretraining(*args)
    assert listing(out) == before, "a refused run must not write anything"


def test_a_second_run_loads_the_saved_windows_instead_of_tokenizing(corpus_file, tokenizer_dir, tmp_path, capsys):
    windows_dir = tmp_path / "windows"
    short = dict(windows_dir=str(windows_dir), max_steps=2, eval_every=2, save_every=2, report_to="none")
    run_pretraining(*tiny_args(tmp_path / "one", corpus_file, tokenizer_dir, tmp_path / "cache_one", **short))
    first = capsys.readouterr().out
    [folder] = windows_dir.iterdir()
    assert f"windows tokenized and saved to {folder}" in first
    run_pretraining(*tiny_args(tmp_path / "two", corpus_file, tokenizer_dir, tmp_path / "cache_two", **short))
    assert f"windows reused from {folder}" in capsys.readouterr().out
    assert not (tmp_path / "cache_two").exists()  # its own datasets cache stayed empty: nothing was tokenized
    assert logged_losses(tmp_path / "two") == logged_losses(tmp_path / "one")
    # The saved windows are the ones a fresh tokenization gives (tiny_args holds out the last 10% of characters).
    text = corpus_file.read_text(encoding="utf-8")
    cut = len(text) - round(0.1 * len(text))
    saved = datasets.load_from_disk(folder)
    for split, part in (("train", text[:cut]), ("validation", text[cut:])):
        fresh = build_lm_datasets([part], tokenizer_dir, context_length=32, validation_fraction=0, cache_dir=tmp_path)
        assert saved[split].to_dict() == fresh["train"].to_dict()
    # Another stride (or corpus, tokenizer, context length) is other windows: another folder.
    other = dict(short, stride=16)
    run_pretraining(*tiny_args(tmp_path / "three", corpus_file, tokenizer_dir, tmp_path / "cache_three", **other))
    assert "windows tokenized and saved to" in capsys.readouterr().out
    assert len(list(windows_dir.iterdir())) == 2


def test_missing_training_file(tmp_path, tokenizer_dir):
    out = tmp_path / "out"
    args = tiny_args(out, tmp_path / "nope.txt", tokenizer_dir, tmp_path / "cache")
    _expect_refusal(args, DataError, "nope.txt does not exist", out)
    assert not out.exists()


def test_missing_tokenizer(tmp_path, corpus_file):
    out = tmp_path / "out"
    args = tiny_args(out, corpus_file, tmp_path / "no_tokenizer", tmp_path / "cache")
    _expect_refusal(args, DataError, "no tokenizer at .*no_tokenizer", out)


def test_tokenizer_vocab_differs_from_model(tmp_path, corpus_file, tokenizer_dir):
    out = tmp_path / "out"
    args = tiny_args(out, corpus_file, tokenizer_dir, tmp_path / "cache", vocab_size=1000)
    _expect_refusal(args, DataError, "tokenizer has 512 tokens but the model's vocab_size is 1000", out)


def test_fsdp_on_one_process_is_refused_before_writing(tmp_path, corpus_file, tokenizer_dir):
    out = tmp_path / "out"
    args = tiny_args(out, corpus_file, tokenizer_dir, tmp_path / "cache", fsdp=True)
    _expect_refusal(args, ValueError, "--fsdp shards the model over several processes: launch with accelerate", out)


def test_corpus_shorter_than_a_window(tmp_path, tokenizer_dir):
    corpus = tmp_path / "short.txt"
    corpus.write_text("Too short to fill one window of 33 tokens, even held out.\n" * 3)
    out = tmp_path / "out"
    args = tiny_args(out, corpus, tokenizer_dir, tmp_path / "cache")
    _expect_refusal(args, DataError, "fewer than one window", out)


def test_folder_with_unrelated_files_is_never_used(tmp_path, corpus_file, tokenizer_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for flag in ({}, {"overwrite": True}, {"resume": True}):
        args = tiny_args(out, corpus_file, tokenizer_dir, tmp_path / "cache", **flag)
        _expect_refusal(args, RunFolderError, "not a run folder", out)


def test_folder_with_another_run(finished_run, corpus_file, tokenizer_dir, tmp_path):
    _, out = finished_run
    args = tiny_args(out, corpus_file, tokenizer_dir, tmp_path / "cache", max_steps=20)
    _expect_refusal(args, RunFolderError, "already holds a run. Pass --resume .* or --overwrite", out)


def test_resume_with_another_model_shape_or_tokenizer(finished_run, corpus_file, tokenizer_dir, tmp_path):
    _, out = finished_run
    args = tiny_args(out, corpus_file, None, tmp_path / "cache", max_steps=20, n_layers=3, resume=True)
    _expect_refusal(args, RunFolderError, r"model.n_layers: saved run has 2, this run has 3", out)
    args = tiny_args(out, corpus_file, tokenizer_dir, tmp_path / "cache", max_steps=20, resume=True)
    _expect_refusal(args, RunFolderError, r"tokenizer.path: saved run has '<missing>'", out)


def test_overwrite_replaces_a_run(corpus_file, tokenizer_dir, tmp_path):
    out = tmp_path / "out"
    run_pretraining(
        *tiny_args(out, corpus_file, tokenizer_dir, tmp_path / "cache", max_steps=2, eval_every=2, save_every=2)
    )
    (out / "checkpoints" / "step_999").mkdir()  # something only the old run had
    run_pretraining(
        *tiny_args(
            out, corpus_file, tokenizer_dir, tmp_path / "cache", max_steps=3, eval_every=3, save_every=3, overwrite=True
        )
    )
    assert [step for step, _ in list_checkpoints(out / "checkpoints")] == [3]
    assert not (out / "checkpoints" / "step_999").exists()
    assert max(r["step"] for r in read_metrics(out)) == 3


def test_the_training_file_is_read_once(corpus_file, tokenizer_dir, tmp_path, monkeypatch):
    """One read of --train_file serves the resume fingerprint, the windows' folder name, the tokenizer
    and the windows (--split_by characters: it was read four times before). Split by tokens, the file
    is streamed, so each use that needs its text reads it: the hash, then the tokenization when the
    windows are not saved yet (training a tokenizer would be one more)."""
    opened = []
    real_open = io.open

    def counting_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and Path(file).resolve() == corpus_file.resolve():
            opened.append(file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(io, "open", counting_open)
    monkeypatch.setattr(builtins, "open", counting_open)
    short = dict(max_steps=2, eval_every=2, save_every=2, report_to="none")
    run_pretraining(*tiny_args(tmp_path / "one", corpus_file, None, tmp_path / "cache", **short))
    assert len(opened) == 1
    by_tokens = dict(short, split_by="tokens")
    for out, reads in (("two", 2), ("three", 1)):  # the windows built, then loaded
        opened.clear()
        run_pretraining(*tiny_args(tmp_path / out, corpus_file, tokenizer_dir, tmp_path / "cache", **by_tokens))
        assert len(opened) == reads, out


# ----------------------------------------------------------------------------- a run from before the layout move

# What the code before the layout move (0cd5885) stored for `tiny_args(..., **OLD_RUN)`, read from a run
# folder it wrote: run_config.json's fingerprint (the corpus's path, size and SHA-256 filled in by `old_fingerprint`),
# the JSON files of a checkpoint and its tensor names.
OLD_RUN = dict(max_steps=4, warmup_steps=2, eval_every=2, save_every=2, report_to="none")
OLD_OPTIMIZATION = {
    "adam_beta1": 0.9,
    "adam_beta2": 0.95,
    "attention": "auto",
    "gradient_accumulation_steps": 1,
    "learning_rate": 0.003,
    "max_grad_norm": 1.0,
    "max_steps": 4,
    "max_time_seconds": None,
    "min_learning_rate": 0.0003,
    "mixed_precision": "no",
    "muon_learning_rate": 0.02,
    "optimizer": "adamw",
    "per_device_batch_size": 8,
    "seed": 1337,
    "warmup_steps": 2,
    "weight_decay": 0.1,
}
OLD_TRAIN_STATE = {"accelerator_step", "scaler", "train_state"}  # train_state.json's keys
OLD_STATE = {"batches_in_epoch", "epoch", "step", "tokens_seen", "train_seconds"}  # ... and its train_state's
OLD_CHECKPOINT_FILES = ["model.safetensors", "optimizer.pt", "rng_rank0.safetensors", "train_state.json"]
OLD_TENSOR_SUFFIXES = {
    "att.W_key",
    "att.W_query",
    "att.W_value",
    "att.out_proj",
    "ff.fc_in",
    "ff.fc_out",
    "norm1",
    "norm2",
}


def old_fingerprint(corpus: Path) -> dict:
    data = corpus.read_bytes()
    train_file = {"path": str(corpus.resolve()), "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    return {
        "data": {
            "split_by": "characters",
            "streaming": False,
            "stride": None,
            "train_file": train_file,
            "validation_file": None,
            "validation_fraction": 0.1,
        },
        "model": {
            "context_length": 32,
            "drop_rate": 0.1,
            "emb_dim": 32,
            "n_heads": 2,
            "n_layers": 2,
            "vocab_size": 400,
        },
        "optimization": OLD_OPTIMIZATION,
        "tokenizer": {"trained_vocab_size": 400},
    }


def pickled_modules(path: Path) -> set[str]:
    """The modules whose globals a torch.save file's pickle names."""
    with zipfile.ZipFile(path) as archive:
        [pickle] = [name for name in archive.namelist() if name.endswith("data.pkl")]
        ops = list(pickletools.genops(archive.read(pickle)))
    return {arg.split(" ")[0] for op, arg, _ in ops if op.name == "GLOBAL"}


def test_a_run_started_before_the_layout_move_resumes_after_it(corpus_file, tmp_path, capsys):
    """Nothing a run stores names a module of ours: run_config.json and a checkpoint's JSON files hold
    settings and names of the run, its tensors are keyed by parameter names, optimizer.pt pickles only
    torch tensors in plain containers (read back with weights_only=True). So a run folder written by
    the code before the layout move resumes with this code if this code records the same fingerprint
    and checkpoint files. Checked here without the old code (no git, no binary fixture): this code's
    run must write what the old one wrote (the literals above, taken from a folder it wrote), and a
    folder made of the old record, a step-2 checkpoint and the log up to it (what a run killed after
    that checkpoint leaves) resumes to the uninterrupted run's weights. (Its windows are tokenized
    again once: their cache folder is now named by the file's SHA-256, was by a length-prefixed hash.)"""
    reference = tmp_path / "reference"
    run_pretraining(*tiny_args(reference, corpus_file, None, tmp_path / "cache", **OLD_RUN))
    record = json.loads((reference / "run_config.json").read_text())
    assert record["fingerprint"] == old_fingerprint(corpus_file)
    step_2 = reference / "checkpoints" / "step_2"
    train_state = json.loads((step_2 / "train_state.json").read_text())
    assert set(train_state) == OLD_TRAIN_STATE and set(train_state["train_state"]) == OLD_STATE
    complete = json.loads((step_2 / "checkpoint_complete.json").read_text())
    assert (complete["format"], complete["num_processes"], complete["step"]) == ("minigpt-checkpoint-v1", 1, 2)
    assert sorted(complete["files"]) == OLD_CHECKPOINT_FILES
    with safe_open(step_2 / "model.safetensors", "pt") as tensors:
        blocks = {
            key.split(".", 3)[3].rsplit(".", 1)[0] for key in tensors.keys() if key.startswith("model.trf_blocks.")
        }  # noqa: SIM118
    assert blocks == OLD_TENSOR_SUFFIXES
    assert pickled_modules(step_2 / "optimizer.pt") <= {"torch", "torch._utils", "collections"}

    old = tmp_path / "old"
    (old / "checkpoints").mkdir(parents=True)
    shutil.copytree(step_2, old / "checkpoints" / "step_2")
    shutil.copytree(reference / "tokenizer", old / "tokenizer")
    (old / "run_config.json").write_text(json.dumps({"fingerprint": old_fingerprint(corpus_file), "config": {}}))
    logged = [r for r in read_metrics(reference) if r["step"] <= 2]
    (old / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in logged))
    capsys.readouterr()
    run_pretraining(*tiny_args(old, corpus_file, None, tmp_path / "another_cache", **OLD_RUN, resume=True))
    assert "resuming from step 2" in capsys.readouterr().out
    expected, actual = (
        load_file(reference / "model" / "model.safetensors"),
        load_file(old / "model" / "model.safetensors"),
    )
    assert expected.keys() == actual.keys() and all(torch.equal(expected[k], actual[k]) for k in expected)
    assert logged_losses(old) == logged_losses(reference)


# ----------------------------------------------------------------------------- the script


@pytest.fixture(scope="module")
def script():
    """scripts/pretrain.py as a module (the SIGKILL and DDP tests run it as a real process)."""
    return load_script("pretrain")


def test_script_help_lists_every_group(script, capsys):
    with pytest.raises(SystemExit) as exit_:
        script.parse_args(["--help"])
    assert exit_.value.code == 0
    help_text = capsys.readouterr().out
    for flag in (
        "--n_layers",
        "--train_file",
        "--tokenizer_path",
        "--max_time_seconds",
        "--gradient_accumulation_steps",
        "--resume",
    ):
        assert flag in help_text


def test_script_yaml_config_with_overrides(script, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("train_file: a.txt\nn_layers: 3\nlearning_rate: 1e-3\nmax_steps: 7\noutput_dir: runs/x\n")
    model, data, loop = script.parse_args([str(config), "--max_steps", "9", "--resume"])
    assert (model.n_layers, data.train_file, loop.learning_rate, loop.max_steps, loop.resume) == (
        3,
        "a.txt",
        1e-3,
        9,
        True,
    )
    config.write_text("train_file: a.txt\nn_layer: 3\n")
    with pytest.raises(ValueError, match=r"unknown keys \['n_layer'\]"):
        script.parse_args([str(config)])


def test_script_reports_bad_input_as_one_line(script, tmp_path, corpus_file, capsys):
    out = tmp_path / "out"
    flags = script_flags(out, corpus_file, tmp_path / "missing_tokenizer", tmp_path / "cache")
    assert script.main(flags) == 1
    assert capsys.readouterr().err.startswith("error: no tokenizer at")
    assert script.main([*flags, "--min_learning_rate", "1e-2"]) == 1  # above the peak of 3e-3
    assert "need 0 <= --min_learning_rate <= --learning_rate" in capsys.readouterr().err
    assert not out.exists()


# ----------------------------------------------------------------------------- SIGKILL, in a real process


def _wait(process: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    assert process.wait(timeout=timeout) == 0, log.read_text()[-3000:]


@pytest.mark.slow
def test_sigkill_then_resume_gives_bit_identical_weights(tmp_path, corpus_file, tokenizer_dir):
    steps = 100  # long enough to be killed mid-run; 2 micro-batches a step, 18 an epoch: ~11 epochs
    common = dict(max_steps=steps, gradient_accumulation_steps=2, save_every=15, eval_every=40, keep_last=2)
    reference_out, killed_out = tmp_path / "reference", tmp_path / "killed"
    # The uninterrupted run goes alongside the one that gets killed (one thread each).
    reference = launch(
        PRETRAIN_SCRIPT,
        script_flags(reference_out, corpus_file, tokenizer_dir, tmp_path / "cache", **common),
        tmp_path / "reference.log",
    )
    flags = script_flags(killed_out, corpus_file, tokenizer_dir, tmp_path / "cache", **common)
    # Killed from inside as step 41 is about to be logged: 40 steps logged and evaluated, the last
    # checkpoint at step 30, the step after the kill computed and lost.
    killed_before_logging(PRETRAIN_SCRIPT, flags, 41, tmp_path)
    assert max(r["step"] for r in read_metrics(killed_out)) == 40 and not (killed_out / "model").exists()

    resumed = launch(PRETRAIN_SCRIPT, flags + ["--resume", "true"], tmp_path / "resumed.log")
    _wait(resumed, tmp_path / "resumed.log")
    _wait(reference, tmp_path / "reference.log")
    output = (tmp_path / "resumed.log").read_text()
    assert int(output.split("resuming from step ")[1].split()[0]) == 30

    expected = load_file(reference_out / "model" / "model.safetensors")
    actual = load_file(killed_out / "model" / "model.safetensors")
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected), (
        "resumed weights differ from the uninterrupted run"
    )
    # The log continues without gaps or repeats, with exactly the uninterrupted run's numbers.
    assert logged_losses(killed_out) == logged_losses(reference_out)
    assert [r["step"] for r in read_metrics(killed_out) if "train_loss" in r] == list(range(1, steps + 1))
    val = lambda out: [(r["step"], r["val_loss"], r["sample"]) for r in read_metrics(out) if "val_loss" in r]  # noqa: E731
    assert val(killed_out) == val(reference_out)
