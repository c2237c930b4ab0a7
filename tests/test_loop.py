"""training/loop.py: exact resume in-process, the NaN guard, the metrics log and the optimizer's decay groups."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from accelerate.utils import set_seed
from helpers.runs import logged_losses, read_metrics

from modeling_minigpt import MiniGPTConfig, MiniGPTForCausalLM
from modeling_minigpt.files import file_sha256
from training.checkpoint import CHECKPOINT_MARKER, CheckpointError, Resumable, list_checkpoints, verify_checkpoint
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


def _tiny_setup(output_dir: Path, **loop_overrides):
    """A 2-layer model with dropout on random windows: (accelerator, model, optimizer, loader, args, state, metrics)."""
    defaults = dict(
        max_steps=16,
        per_device_batch_size=4,
        gradient_accumulation_steps=2,
        warmup_steps=3,
        log_every=1,
        eval_every=100,
        save_every=3,
        keep_last=3,
        report_to="none",
    )
    args = LoopArguments(output_dir=str(output_dir), **{**defaults, **loop_overrides})
    accelerator = make_accelerator(args)
    set_seed(args.seed)
    windows = [{"input_ids": row} for row in torch.randint(0, 97, (44, 17), generator=torch.Generator().manual_seed(0))]
    loader = make_train_dataloader(
        windows, args.per_device_batch_size, collate_windows, args.seed
    )  # 11 micro-batches/epoch
    config = MiniGPTConfig.from_preset(
        "tiny", vocab_size=97, context_length=16, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.2
    )
    model = MiniGPTForCausalLM(config)
    optimizer = build_optimizer(model, args.learning_rate, args.weight_decay)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    state = TrainState()
    metrics = MetricsLog(output_dir / "metrics.jsonl")
    return accelerator, model, optimizer, loader, args, state, metrics


def resumable(setup) -> Resumable:
    """What a checkpoint of `_tiny_setup`'s run holds."""
    _, model, optimizer, loader, _, state, _ = setup
    return Resumable(model, optimizer, state, [loader])


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
    assert resume_from_latest(accelerator, tmp_path / "cut", metrics, resumable(setup)) == 9
    assert (state.step, state.epoch, state.batches_in_epoch) == (9, 1, 7)
    train_loop(*setup)
    resumed = accelerator.unwrap_model(model).state_dict()
    assert all(torch.equal(full[name], resumed[name]) for name in full)
    assert logged_losses(tmp_path / "cut") == logged_losses(tmp_path / "full")


def test_resume_without_a_checkpoint_starts_over(tmp_path):
    """Killed before its first checkpoint: --resume starts at step 0 and the old log goes."""
    setup = _tiny_setup(tmp_path)
    accelerator, *_, state, metrics = setup
    for step in (0, 1, 2):
        metrics.write({"step": step, "train_loss": 5.0})
    assert resume_from_latest(accelerator, tmp_path, metrics, resumable(setup)) is None
    assert state.step == 0 and metrics.records() == []


def test_nan_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(tmp_path):
    setup = _tiny_setup(tmp_path)
    accelerator, model, *_, state, _ = setup

    def loss_fn(model, batch):
        loss = model(**batch).loss
        return loss * float("nan") if state.step + 1 == 8 else loss

    with pytest.raises(
        NonFiniteLossError, match=r"non-finite training loss at step 8: loss=nan.*last good checkpoint: .*step_6"
    ):
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


def test_weight_decay_only_on_matrices():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert {tuple(p.shape) for p in decayed["params"]} == {(10, 4), (4, 4)}
    assert sorted(tuple(p.shape) for p in plain["params"]) == [(4,), (4,), (4,)]  # bias, LN weight, LN bias
    assert optimizer.defaults["betas"] == (0.9, 0.95)


def test_frozen_parameters_are_left_out():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model[0].requires_grad_(False)  # e.g. a frozen backbone under a classification head
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.1)
    assert [tuple(p.shape) for g in optimizer.param_groups for p in g["params"]] == [(2, 4), (2,)]


def test_tied_weights_are_optimized_once():
    embedding = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = embedding.weight
    model = torch.nn.ModuleDict({"wte": embedding, "head": head})
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.1)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == 1


# ----------------------------------------------------------------------------- the checkpoint format


def _checkpointed_run(tmp_path: Path):
    """A 6-step run with checkpoints at 3 and 6, and a fresh setup on the same folder to resume it."""
    train_loop(*_tiny_setup(tmp_path, max_steps=6))
    return _tiny_setup(tmp_path, max_steps=6)


def _rehash(folder: Path, name: str) -> None:
    """Rewrite the manifest entry of `name` to match the file: what an attacker who edits both would do."""
    manifest = json.loads((folder / CHECKPOINT_MARKER).read_text())
    manifest["files"][name] = {"size": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)}
    (folder / CHECKPOINT_MARKER).write_text(json.dumps(manifest))


def test_checkpoint_holds_no_pickle_and_the_optimizer_state_by_parameter_name(tmp_path):
    setup = _checkpointed_run(tmp_path)
    folder = tmp_path / "checkpoints" / "step_6"
    manifest = verify_checkpoint(folder)
    assert sorted(manifest["files"]) == [
        "model.safetensors",
        "optimizer.pt",
        "rng_rank0.safetensors",
        "train_state.json",
    ]
    optimizer = torch.load(folder / "optimizer.pt", weights_only=True)  # refuses anything but tensors and plain values
    names = [name for name, p in setup[0].unwrap_model(setup[1]).named_parameters() if p.requires_grad]
    # The keys training.distributed.full_training_state gathers from an FSDP2 run: one format for both.
    assert sorted(optimizer["state"]) == sorted(names)
    assert json.loads((folder / "train_state.json").read_text())["train_state"]["step"] == 6


def test_a_crafted_pickle_in_a_checkpoint_never_runs(tmp_path):
    """optimizer.pt replaced by a pickle that would create a file, its manifest entry forged to match:
    torch.load(weights_only=True) refuses it, no checkpoint is left, the run is refused."""
    setup = _checkpointed_run(tmp_path)
    marker = tmp_path / "RAN"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    for _, folder in list_checkpoints(tmp_path / "checkpoints"):
        torch.save({"state": Payload()}, folder / "optimizer.pt")
        _rehash(folder, "optimizer.pt")
    with pytest.raises(CheckpointError, match=r"step_6 does not fit this run: UnpicklingError"):
        resume_from_latest(setup[0], tmp_path, setup[-1], resumable(setup))
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["missing rng file", "changed byte", "extra file", "foreign format"])
def test_a_damaged_checkpoint_is_skipped_for_the_previous_one(tmp_path, damage, capsys):
    setup = _checkpointed_run(tmp_path)
    folder = tmp_path / "checkpoints" / "step_6"
    if damage == "missing rng file":
        (folder / "rng_rank0.safetensors").unlink()
    elif damage == "changed byte":
        data = bytearray((folder / "model.safetensors").read_bytes())
        data[-1] ^= 1
        (folder / "model.safetensors").write_bytes(bytes(data))
    elif damage == "extra file":
        (folder / "custom_checkpoint_0.pkl").write_bytes(b"x")
    else:
        (folder / CHECKPOINT_MARKER).write_text(json.dumps({"step": 6, "num_processes": 1}))
    assert resume_from_latest(setup[0], tmp_path, setup[-1], resumable(setup)) == 3
    expected = {
        "missing rng file": "is incomplete: rng_rank0.safetensors is missing",
        "changed byte": "its content changed since it was written",
        "extra file": "holds files it did not write: ['custom_checkpoint_0.pkl']",
        "foreign format": "is not a minigpt-checkpoint-v1 manifest",
    }[damage]
    output = capsys.readouterr().out
    assert f"skipping checkpoint step_6: {folder}" in output and expected in output
    assert "resuming from the previous complete checkpoint, step_3" in output
    assert setup[5].step == 3


def test_a_checkpoint_of_another_number_of_processes_is_refused(tmp_path):
    setup = _checkpointed_run(tmp_path)
    for _, folder in list_checkpoints(tmp_path / "checkpoints"):
        manifest = json.loads((folder / CHECKPOINT_MARKER).read_text())
        manifest["num_processes"] = 2
        manifest["files"]["rng_rank1.safetensors"] = manifest["files"]["rng_rank0.safetensors"]
        shutil.copy(folder / "rng_rank0.safetensors", folder / "rng_rank1.safetensors")
        (folder / CHECKPOINT_MARKER).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="written by 2 processes but this run has 1"):
        resume_from_latest(setup[0], tmp_path, setup[-1], resumable(setup))


def test_a_large_finite_loss_stops_the_run_as_diverged(tmp_path):
    """A loss of 1e6 nats is finite (no NaN check catches it) but the run is gone: a clean stop."""
    setup = _tiny_setup(tmp_path, divergence_loss=50.0)
    state = setup[5]

    def loss_fn(model, batch):
        loss = model(**batch).loss
        return loss * 1e6 if state.step + 1 == 5 else loss

    with pytest.raises(NonFiniteLossError, match=r"diverged: training loss above --divergence_loss 50.0 at step 5"):
        train_loop(*setup, loss_fn=loss_fn)
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [3]
