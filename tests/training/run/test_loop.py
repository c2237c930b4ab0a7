"""training/run/loop.py: exact resume in-process (AdamW and Muon, fp32 and bf16), the NaN guard, a time budget
on an injected clock, the metrics log, the schedule applied to each group, bf16 autocast, and resuming from the
checkpoint format (damaged, crafted or foreign checkpoints)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import pytest
import torch
from accelerate.utils import set_seed
from helpers.runs import logged_losses, read_metrics, reset_accelerate_state

from modeling_minigpt import MiniGPTConfig, MiniGPTForCausalLM
from modeling_minigpt.files import file_sha256
from training.data.collate import collate_windows
from training.run.accelerator import make_accelerator
from training.run.arguments import LoopArguments
from training.run.checkpoint import CHECKPOINT_MARKER, CheckpointError, Resumable, list_checkpoints, verify_checkpoint
from training.run.distributed import RankBatches
from training.run.loop import (
    MetricsLog,
    NonFiniteLossError,
    TrainState,
    make_train_dataloader,
    resume_from_latest,
    train_loop,
)
from training.run.optim import make_optimizer
from training.run.schedule import lr_factor


def _tiny_setup(output_dir: Path, stream: bool = False, **loop_overrides):
    """A 2-layer model with dropout on random windows: (accelerator, model, optimizer, loader, args, state, metrics).

    With `stream`, the windows come as a stream in `RankBatches` (one rank), not through prepare."""
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
        mixed_precision="no",
    )
    args = LoopArguments(output_dir=str(output_dir), **{**defaults, **loop_overrides})
    accelerator = make_accelerator(args)
    set_seed(args.seed)
    windows = [{"input_ids": row} for row in torch.randint(0, 97, (44, 17), generator=torch.Generator().manual_seed(0))]
    if stream:
        rows = datasets.IterableDataset.from_generator(_rows, gen_kwargs={"windows": [w["input_ids"] for w in windows]})
        loader = RankBatches(
            rows, args.per_device_batch_size, collate_windows, rank=0, world_size=1, seed=args.seed, shuffle_buffer=16
        )
    else:
        loader = make_train_dataloader(windows, args.per_device_batch_size, collate_windows, args.seed)
    # 11 micro-batches per epoch either way
    config = MiniGPTConfig.from_preset(
        "tiny", vocab_size=97, context_length=16, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.2
    )
    model = MiniGPTForCausalLM(config)
    optimizer = make_optimizer(model, args)
    if stream:
        model, optimizer = accelerator.prepare(model, optimizer)
    else:
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    state = TrainState()
    metrics = MetricsLog(output_dir / "metrics.jsonl")
    return accelerator, model, optimizer, loader, args, state, metrics


def _rows(windows):
    for ids in windows:
        yield {"input_ids": ids.tolist()}


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


@pytest.mark.parametrize(
    ("optimizer", "precision", "stream"),
    [
        ("adamw", "no", False),
        ("muon", "no", False),
        ("adamw", "bf16", False),
        ("muon", "bf16", False),
        ("adamw", "no", True),
    ],
)
def test_resume_in_process_is_bit_exact_mid_epoch_with_accumulation(tmp_path, optimizer, precision, stream):
    """Checkpoint at step 9 = 18 micro-batches = epoch 1, batch 7 of 11: resume must skip exactly those
    (a stream reads them again and drops them). Both optimizers, in fp32 and under bf16 autocast
    (forced, so the bf16 path runs on any CPU)."""
    flags = dict(optimizer=optimizer, mixed_precision=precision)
    setup = _tiny_setup(tmp_path / "full", stream, **flags)
    assert setup[0].mixed_precision == precision
    train_loop(*setup)
    full = setup[0].unwrap_model(setup[1]).state_dict()

    setup = _tiny_setup(tmp_path / "cut", stream, **flags)
    with pytest.raises(Interrupted):
        train_loop(*setup, loss_fn=_interrupt_after(2 * 10 + 1))  # dies inside step 11
    setup = _tiny_setup(tmp_path / "cut", stream, **flags)
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


# ----------------------------------------------------------------------------- a time budget, on an injected clock


def _run_on_a_fake_clock(output_dir: Path, seconds_per_micro_batch: float, **overrides):
    """A time-budgeted run whose clock advances only as micro-batches are computed: a machine of a
    known speed, so the test needs no real time. Returns (state, logged training entries, args)."""
    setup = _tiny_setup(output_dir, **{"max_steps": 10**6, "save_every": 10**6, **overrides})
    now = 0.0

    def loss_fn(model, batch):
        nonlocal now
        now += seconds_per_micro_batch
        return model(**batch).loss

    train_loop(*setup, loss_fn=loss_fn, clock=lambda: now)
    return setup[5], [r for r in read_metrics(output_dir) if "train_loss" in r], setup[4]


def test_time_budget_stops_by_the_clock_and_decays_to_the_floor(tmp_path):
    # 2 micro-batches a step at 0.25 s each: 0.5 s a step, so a 3 s budget ends after step 6.
    state, train, args = _run_on_a_fake_clock(tmp_path / "a", 0.25, max_time_seconds=3.0)
    assert state.step == 6 and state.train_seconds == 3.0
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert [r["elapsed_seconds"] for r in train] == [0.5 * s for s in range(1, 7)]
    # Warmup counts steps (3), then the cosine runs over the clock: step s starts at 0.5 s x s.
    expected = [args.learning_rate * lr_factor(args, s, 0.5 * s) for s in range(6)]
    assert [r["lr"] for r in train] == pytest.approx(expected, rel=1e-12)
    assert [r["lr"] for r in train][:3] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3])  # warmup to the 1e-3 peak
    decay = [r["lr"] for r in train][2:]
    assert all(a > b for a, b in zip(decay, decay[1:], strict=False))
    # at the budget's end the schedule stands at the floor
    assert args.learning_rate * lr_factor(args, 6, 3.0) == pytest.approx(args.min_learning_rate)


def test_a_machine_twice_as_fast_takes_twice_the_steps_in_the_same_budget(tmp_path):
    slow, *_ = _run_on_a_fake_clock(tmp_path / "slow", 0.25, max_time_seconds=3.0)
    fast, *_ = _run_on_a_fake_clock(tmp_path / "fast", 0.125, max_time_seconds=3.0)
    assert (slow.step, fast.step) == (6, 12)
    capped, *_ = _run_on_a_fake_clock(tmp_path / "capped", 0.125, max_time_seconds=3.0, max_steps=5)
    assert capped.step == 5  # max_steps stays an upper bound


# ----------------------------------------------------------------------------- the schedule, per parameter group


def test_the_schedule_scales_each_group_from_its_own_peak(tmp_path):
    setup = _tiny_setup(tmp_path, optimizer="muon", muon_learning_rate=0.02, max_steps=5, warmup_steps=2)
    optimizer, args = setup[2], setup[4]
    train_loop(*setup)
    factor = lr_factor(args, 4, 0.0)  # the last step's factor
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.02 * factor, 1e-3 * factor, 1e-3 * factor])
    assert read_metrics(tmp_path)[-1]["lr"] == pytest.approx(1e-3 * factor)  # the log follows --learning_rate


# ----------------------------------------------------------------------------- under bf16 autocast


def test_bf16_autocast_changes_the_arithmetic_but_keeps_fp32_weights_and_state(tmp_path):
    fp32 = _tiny_setup(tmp_path / "fp32", max_steps=4)
    train_loop(*fp32)
    reset_accelerate_state()  # the next run switches to bf16 in this process
    bf16 = _tiny_setup(tmp_path / "bf16", max_steps=4, mixed_precision="bf16")
    train_loop(*bf16)
    model, optimizer = bf16[0].unwrap_model(bf16[1]), bf16[2]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    assert state and all(t.dtype == torch.float32 for t in state)
    losses = [[loss for _, loss, _ in logged_losses(tmp_path / name)] for name in ("fp32", "bf16")]
    assert losses[0] != losses[1]  # autocast really ran in bf16 ...
    assert losses[0] == pytest.approx(losses[1], abs=0.05)  # ... and trains the same model


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
    # The keys training.run.distributed.full_training_state gathers from an FSDP2 run: one format for both.
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
