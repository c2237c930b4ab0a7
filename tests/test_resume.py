"""Exact resume: atomic checkpoints, bit-identical weights after SIGKILL + --resume, a gap-free log,
and a diverging run stopping at the step where the loss became NaN."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file

from modeling_minigpt import MiniGPTConfig, MiniGPTForCausalLM
from processes import launch, sigkill_after_step
from test_pretrain import SCRIPT, corpus_file, read_metrics, script_flags, tokenizer_dir  # noqa: F401
from training.checkpoint import (
    CHECKPOINT_MARKER,
    checkpoint_dir,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from training.collate import collate_windows
from training.loop import (
    LoopArguments,
    MetricsLog,
    NonFiniteLossError,
    TrainState,
    build_optimizer,
    make_accelerator,
    make_train_dataloader,
    resume_from_latest,
    train_loop,
)

# ----------------------------------------------------------------------------- checkpoints


def test_incomplete_checkpoints_are_ignored(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (5, 10):
        checkpoint_dir(root, step).mkdir(parents=True)
        (checkpoint_dir(root, step) / CHECKPOINT_MARKER).write_text(json.dumps({"step": step, "num_processes": 1}))
    (root / ".tmp-step_15").mkdir()  # killed while accelerate was writing
    (root / "step_20").mkdir()  # a folder without the marker written last
    (root / "step_20" / "model.safetensors").write_text("")
    assert [s for s, _ in list_checkpoints(root)] == [5, 10]
    assert latest_checkpoint(root) == checkpoint_dir(root, 10)
    assert latest_checkpoint(tmp_path / "none") is None


# ----------------------------------------------------------------------------- the loop, in process


def _tiny_setup(output_dir: Path, **loop_overrides):
    """A 2-layer model with dropout on random windows: (accelerator, model, optimizer, loader, args, state, metrics)."""
    args = LoopArguments(
        output_dir=str(output_dir), max_steps=16, per_device_batch_size=4, gradient_accumulation_steps=2,
        warmup_steps=3, log_every=1, eval_every=100, save_every=3, keep_last=3, report_to="none", **loop_overrides,
    )
    accelerator = make_accelerator(args)
    set_seed(args.seed)
    windows = [{"input_ids": row} for row in torch.randint(0, 97, (44, 17), generator=torch.Generator().manual_seed(0))]
    loader = make_train_dataloader(windows, args.per_device_batch_size, collate_windows, args.seed)  # 11 micro-batches/epoch
    config = MiniGPTConfig.from_preset("tiny", vocab_size=97, context_length=16, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.2)
    model = MiniGPTForCausalLM(config)
    optimizer = build_optimizer(model, args.learning_rate, args.weight_decay)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    state = TrainState()
    accelerator.register_for_checkpointing(state)
    metrics = MetricsLog(output_dir / "metrics.jsonl")
    return accelerator, model, optimizer, loader, args, state, metrics


class Interrupted(Exception):
    pass


def _interrupt_after(micro_batches: int):
    calls = 0

    def loss_fn(model, batch):
        nonlocal calls
        calls += 1
        if calls > micro_batches:
            raise Interrupted
        return model(**batch).loss

    return loss_fn


def test_resume_in_process_is_bit_exact_mid_epoch_with_accumulation(tmp_path):
    """Checkpoint at step 9 = 18 micro-batches = epoch 1, batch 7 of 11: resume must skip exactly those."""
    setup = _tiny_setup(tmp_path / "full")
    train_loop(*setup)
    full = setup[0].unwrap_model(setup[1]).state_dict()

    setup = _tiny_setup(tmp_path / "cut")
    with pytest.raises(Interrupted):
        train_loop(*setup, loss_fn=_interrupt_after(2 * 10 + 1))  # dies inside step 11
    setup = _tiny_setup(tmp_path / "cut")
    accelerator, model, _, _, _, state, metrics = setup
    assert resume_from_latest(accelerator, tmp_path / "cut", metrics) == 9
    assert (state.step, state.epoch, state.batches_in_epoch) == (9, 1, 7)
    train_loop(*setup)
    resumed = accelerator.unwrap_model(model).state_dict()
    assert all(torch.equal(full[name], resumed[name]) for name in full)
    assert _losses(tmp_path / "cut") == _losses(tmp_path / "full")


def _losses(output_dir: Path) -> list[tuple[int, float, float]]:
    return [(r["step"], r["train_loss"], r["lr"]) for r in read_metrics(output_dir) if "train_loss" in r]


def test_resume_without_a_checkpoint_starts_over(tmp_path):
    """Killed before its first checkpoint: --resume starts at step 0 and the old log goes."""
    accelerator, *_, state, metrics = _tiny_setup(tmp_path)
    for step in (0, 1, 2):
        metrics.write({"step": step, "train_loss": 5.0})
    assert resume_from_latest(accelerator, tmp_path, metrics) is None
    assert state.step == 0 and metrics.records() == []


def test_resume_refuses_another_number_of_processes(tmp_path):
    accelerator, *_ = _tiny_setup(tmp_path)
    folder = save_checkpoint(accelerator, tmp_path / "checkpoints", 1, keep_last=1)
    (folder / CHECKPOINT_MARKER).write_text(json.dumps({"step": 1, "num_processes": 2}))
    with pytest.raises(ValueError, match="written by 2 processes but this run has 1"):
        load_checkpoint(accelerator, folder)


def test_nan_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(tmp_path):
    setup = _tiny_setup(tmp_path)
    accelerator, model, *_, state, _ = setup

    def loss_fn(model, batch):
        loss = model(**batch).loss
        return loss * float("nan") if state.step + 1 == 8 else loss

    with pytest.raises(NonFiniteLossError, match=r"non-finite training loss at step 8: loss=nan.*last good checkpoint: .*step_6"):
        train_loop(*setup, loss_fn=loss_fn)
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [3, 6]
    assert max(r["step"] for r in read_metrics(tmp_path)) == 7
    weights = accelerator.unwrap_model(model).state_dict()
    assert all(torch.isfinite(w).all() for w in weights.values()), "the NaN step must not reach the weights"


def test_metrics_log_truncation_drops_later_and_partial_lines(tmp_path):
    log = MetricsLog(tmp_path / "m.jsonl")
    for step in range(1, 6):
        log.write({"step": step, "train_loss": 1.0 / step})
    with open(log.path, "a") as f:
        f.write('{"step": 6, "train_lo')  # cut by a crash mid-write
    assert [r["step"] for r in log.records()] == [1, 2, 3, 4, 5]
    log.truncate_after(3)
    assert [r["step"] for r in log.records()] == [1, 2, 3]
    assert log.path.read_text().endswith("}\n")


# ----------------------------------------------------------------------------- SIGKILL, in a real process



def _wait(process: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    assert process.wait(timeout=timeout) == 0, log.read_text()[-3000:]


@pytest.mark.slow
def test_sigkill_then_resume_gives_bit_identical_weights(tmp_path, corpus_file, tokenizer_dir):
    steps = 100  # long enough to be killed mid-run; 2 micro-batches a step, 18 an epoch: ~11 epochs
    common = dict(max_steps=steps, gradient_accumulation_steps=2, save_every=15, eval_every=40, keep_last=2)
    reference_out, killed_out = tmp_path / "reference", tmp_path / "killed"
    # The uninterrupted run goes alongside the one that gets killed (one thread each).
    reference = launch(SCRIPT, script_flags(reference_out, corpus_file, tokenizer_dir, tmp_path / "cache", **common), tmp_path / "reference.log")
    flags = script_flags(killed_out, corpus_file, tokenizer_dir, tmp_path / "cache", **common)
    victim = launch(SCRIPT, flags, tmp_path / "killed.log")
    killed_at = sigkill_after_step(victim, killed_out, 40, tmp_path / "killed.log")
    assert 40 <= killed_at < steps

    resumed = launch(SCRIPT, flags + ["--resume", "true"], tmp_path / "resumed.log")
    _wait(resumed, tmp_path / "resumed.log")
    _wait(reference, tmp_path / "reference.log")
    output = (tmp_path / "resumed.log").read_text()
    resumed_from = int(output.split("resuming from step ")[1].split()[0])
    assert 30 <= resumed_from <= killed_at and resumed_from % 15 == 0

    expected = load_file(reference_out / "model" / "model.safetensors")
    actual = load_file(killed_out / "model" / "model.safetensors")
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected), "resumed weights differ from the uninterrupted run"
    # The log continues without gaps or repeats, with exactly the uninterrupted run's numbers.
    assert _losses(killed_out) == _losses(reference_out)
    assert [r["step"] for r in read_metrics(killed_out) if "train_loss" in r] == list(range(1, steps + 1))
    val = lambda out: [(r["step"], r["val_loss"], r["sample"]) for r in read_metrics(out) if "val_loss" in r]  # noqa: E731
    assert val(killed_out) == val(reference_out)


