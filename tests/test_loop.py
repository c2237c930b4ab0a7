"""training/loop.py: exact resume in-process, the NaN guard, the metrics log and the optimizer's decay groups."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch
from accelerate.utils import set_seed
from helpers.runs import logged_losses, read_metrics

from modeling_minigpt import MiniGPTConfig, MiniGPTForCausalLM
from training.checkpoint import (
    CHECKPOINT_MARKER,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from training.collate import collate_windows
from training.distributed import RankBatches
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


def _tiny_setup(output_dir: Path, stream: bool = False, **loop_overrides):
    """A 2-layer model with dropout on random windows: (accelerator, model, optimizer, loader, args, state, metrics).

    With `stream`, the windows come as a stream in `RankBatches` (one rank), not through prepare."""
    args = LoopArguments(
        output_dir=str(output_dir),
        max_steps=16,
        per_device_batch_size=4,
        gradient_accumulation_steps=2,
        warmup_steps=3,
        log_every=1,
        eval_every=100,
        save_every=3,
        keep_last=3,
        report_to="none",
        **loop_overrides,
    )
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
    optimizer = build_optimizer(model, args.learning_rate, args.weight_decay)
    if stream:
        model, optimizer = accelerator.prepare(model, optimizer)
    else:
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    state = TrainState()
    accelerator.register_for_checkpointing(state)
    metrics = MetricsLog(output_dir / "metrics.jsonl")
    return accelerator, model, optimizer, loader, args, state, metrics


def _rows(windows):
    for ids in windows:
        yield {"input_ids": ids.tolist()}


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


@pytest.mark.parametrize("stream", [False, True], ids=["dataset", "stream"])
def test_resume_in_process_is_bit_exact_mid_epoch_with_accumulation(tmp_path, stream):
    """Checkpoint at step 9 = 18 micro-batches = epoch 1, batch 7 of 11: resume must skip exactly those
    (a stream reads them again and drops them)."""
    setup = _tiny_setup(tmp_path / "full", stream)
    train_loop(*setup)
    full = setup[0].unwrap_model(setup[1]).state_dict()

    setup = _tiny_setup(tmp_path / "cut", stream)
    with pytest.raises(Interrupted):
        train_loop(*setup, loss_fn=_interrupt_after(2 * 10 + 1))  # dies inside step 11
    setup = _tiny_setup(tmp_path / "cut", stream)
    accelerator, model, _, _, _, state, metrics = setup
    assert resume_from_latest(accelerator, tmp_path / "cut", metrics) == 9
    assert (state.step, state.epoch, state.batches_in_epoch) == (9, 1, 7)
    train_loop(*setup)
    resumed = accelerator.unwrap_model(model).state_dict()
    assert all(torch.equal(full[name], resumed[name]) for name in full)
    assert logged_losses(tmp_path / "cut") == logged_losses(tmp_path / "full")


def test_resume_without_a_checkpoint_starts_over(tmp_path):
    """Killed before its first checkpoint: --resume starts at step 0 and the old log goes."""
    accelerator, *_, state, metrics = _tiny_setup(tmp_path)
    for step in (0, 1, 2):
        metrics.write({"step": step, "train_loss": 5.0})
    assert resume_from_latest(accelerator, tmp_path, metrics) is None
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


def test_resume_refuses_another_number_of_processes(tmp_path):
    accelerator, *_ = _tiny_setup(tmp_path)
    folder = save_checkpoint(accelerator, tmp_path / "checkpoints", 1, keep_last=1)
    (folder / CHECKPOINT_MARKER).write_text(json.dumps({"step": 1, "num_processes": 2}))
    with pytest.raises(ValueError, match="written by 2 processes but this run has 1"):
        load_checkpoint(accelerator, folder)


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
