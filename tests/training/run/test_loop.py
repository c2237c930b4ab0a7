"""training/run/loop.py: exact resume in-process (AdamW and Muon, fp32 and bf16), the NaN guard, a time budget
on an injected clock, the metrics log, the optimizers' groups and state, and the precision and attention choices."""

from __future__ import annotations

import copy
import io
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
from training.run.accelerator import choose_attention, make_accelerator, resolve_attention, resolve_mixed_precision
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
from training.run.optim import build_muon_optimizer, build_optimizer, hidden_matrices, make_optimizer
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


# ----------------------------------------------------------------------------- Muon + AdamW as one optimizer


def _tiny_lm(seed: int = 0, tied: bool = True) -> MiniGPTForCausalLM:
    torch.manual_seed(seed)
    config = MiniGPTConfig.from_preset(
        "tiny", vocab_size=97, context_length=16, emb_dim=32, n_heads=2, n_layers=2, tie_word_embeddings=tied
    )
    return MiniGPTForCausalLM(config)


def _train_steps(model, optimizers, steps: int, seed: int) -> None:
    batches = torch.randint(0, 97, (steps, 4, 17), generator=torch.Generator().manual_seed(seed))
    for window in batches:
        batch = collate_windows([{"input_ids": row} for row in window])
        model(**batch).loss.backward()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("tied", [True, False])
def test_muon_takes_the_matrices_inside_the_blocks_and_adamw_the_rest(tied):
    model = _tiny_lm(tied=tied)
    names = {id(p): n for n, p in model.named_parameters()}
    optimizer = build_muon_optimizer(model, lr=3e-3, muon_lr=0.02, weight_decay=0.1)
    muon, decayed, plain = optimizer.param_groups
    projections = ("W_query", "W_key", "W_value", "out_proj", "fc_in", "fc_out")
    expected = {
        f"model.trf_blocks.{i}.{sub}.{w}.weight"
        for i in range(2)
        for sub, w in (*(("att", w) for w in projections[:4]), *(("ff", w) for w in projections[4:]))
    }
    assert {names[id(p)] for p in muon["params"]} == expected
    embeddings = {"model.tok_emb.weight", "model.pos_emb.weight"} | (set() if tied else {"lm_head.weight"})
    assert {names[id(p)] for p in decayed["params"]} == embeddings
    assert all(p.dim() == 1 for p in plain["params"]) and plain["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    assert [(g["lr"], g["initial_lr"], g["weight_decay"]) for g in optimizer.param_groups] == [
        (0.02, 0.02, 0.1),
        (3e-3, 3e-3, 0.1),
        (3e-3, 3e-3, 0.0),
    ]
    with pytest.raises(ValueError, match="_no_split_modules"):
        hidden_matrices(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_muon_with_adamw_steps_exactly_like_torchs_two_optimizers():
    model = _tiny_lm()
    reference = copy.deepcopy(model)
    combined = build_muon_optimizer(model, lr=3e-3, muon_lr=0.02, weight_decay=0.1)
    params = dict(reference.named_parameters())
    hidden = [p for n, p in params.items() if ".trf_blocks." in n and p.dim() == 2]
    ids = {id(p) for p in hidden}
    rest = [p for p in params.values() if id(p) not in ids]
    parts = [
        torch.optim.Muon(hidden, lr=0.02, weight_decay=0.1),
        torch.optim.AdamW(
            [
                {"params": [p for p in rest if p.dim() == 2], "weight_decay": 0.1},
                {"params": [p for p in rest if p.dim() == 1], "weight_decay": 0.0},
            ],
            lr=3e-3,
            betas=(0.9, 0.95),
        ),
    ]
    _train_steps(model, [combined], 3, seed=1)
    _train_steps(reference, parts, 3, seed=1)
    ours, theirs = model.state_dict(), reference.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert not torch.equal(
        ours["model.trf_blocks.0.att.W_query.weight"], _tiny_lm().state_dict()["model.trf_blocks.0.att.W_query.weight"]
    )


def test_muon_state_dict_is_plain_and_resumes_exactly_after_a_weights_only_load():
    model = _tiny_lm()
    optimizer = build_muon_optimizer(model, lr=3e-3, muon_lr=0.02, weight_decay=0.1)
    _train_steps(model, [optimizer], 2, seed=1)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # no pickled objects: only tensors, numbers, tuples, dicts
    # the standard layout: parameters numbered 0..N-1 over all groups, Muon's group first
    assert sorted(saved["state"]) == list(range(len(list(model.parameters()))))
    assert [len(g["params"]) for g in saved["param_groups"]] == [len(g["params"]) for g in optimizer.param_groups]
    assert len(saved["param_groups"]) == 3 and saved["param_groups"][0]["ns_steps"] == 5  # Muon's group first
    assert set(saved["state"][0]) == {"momentum_buffer"}
    assert set(saved["state"][len(saved["state"]) - 1]) == {"exp_avg", "exp_avg_sq", "step"}

    restored_model = copy.deepcopy(model)
    restored = build_muon_optimizer(
        restored_model, lr=1.0, muon_lr=1.0, weight_decay=0.0
    )  # settings come from the state
    restored.load_state_dict(saved)
    assert [g["initial_lr"] for g in restored.param_groups] == [0.02, 3e-3, 3e-3]
    assert restored.muon.state is restored.state and restored.muon.param_groups[0] is restored.param_groups[0]
    _train_steps(model, [optimizer], 2, seed=2)
    _train_steps(restored_model, [restored], 2, seed=2)
    ours, theirs = model.state_dict(), restored_model.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_the_schedule_scales_each_group_from_its_own_peak(tmp_path):
    setup = _tiny_setup(tmp_path, optimizer="muon", muon_learning_rate=0.02, max_steps=5, warmup_steps=2)
    optimizer, args = setup[2], setup[4]
    train_loop(*setup)
    factor = lr_factor(args, 4, 0.0)  # the last step's factor
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.02 * factor, 1e-3 * factor, 1e-3 * factor])
    assert read_metrics(tmp_path)[-1]["lr"] == pytest.approx(1e-3 * factor)  # the log follows --learning_rate


# ----------------------------------------------------------------------------- mixed precision


@pytest.mark.parametrize(
    "flags, expected",
    [
        ({"avx512_bf16": True, "avx512_f": True}, "bf16"),
        ({"amx_bf16": True}, "bf16"),
        ({"avx512_f": True, "avx2": True}, "no"),
    ],
)
def test_auto_precision_follows_the_cpu_flags(monkeypatch, flags, expected):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: flags)
    mode, why = resolve_mixed_precision("auto", torch.device("cpu"))
    assert mode == expected and why.startswith("auto: ")
    assert "avx512_bf16" in why or "amx_bf16" in why
    assert resolve_mixed_precision("no", torch.device("cpu")) == ("no", "as requested")
    assert resolve_mixed_precision("bf16", torch.device("cpu")) == ("bf16", "as requested")


def test_the_accelerator_uses_and_prints_the_choice(tmp_path, capsys):
    expected, why = resolve_mixed_precision("auto", torch.device("cpu"))
    accelerator = make_accelerator(LoopArguments(output_dir=str(tmp_path), report_to="none"))  # auto is the default
    assert accelerator.mixed_precision == expected
    assert f"({why})" in capsys.readouterr().out


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


@pytest.mark.parametrize(
    "device, precision, context, expected",
    [
        ("cpu", "bf16", 128, "eager"),
        ("cpu", "bf16", 512, "eager"),
        ("cpu", "bf16", 1024, "sdpa"),  # past the measured crossover the fused kernel wins
        ("cpu", "no", 128, "sdpa"),  # in fp32 it always wins
        ("cuda", "bf16", 128, "sdpa"),
    ],
)
def test_auto_attention_is_eager_only_for_short_bf16_contexts_on_a_cpu(device, precision, context, expected):
    implementation, why = resolve_attention("auto", precision, torch.device(device), context)
    assert implementation == expected and why.startswith("auto: ")
    assert resolve_attention("sdpa", precision, torch.device(device), context) == ("sdpa", "as requested")


def test_the_attention_choice_switches_the_run_copy_only_and_the_paths_agree(tmp_path, capsys):
    config = MiniGPTConfig.from_preset("tiny", vocab_size=97, context_length=16, emb_dim=32, n_heads=2, n_layers=2)
    model = MiniGPTForCausalLM(config).eval()
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # a padded row: the 4-D mask each path builds for itself
    with torch.no_grad():
        sdpa = model(input_ids=ids, attention_mask=mask).logits
    reset_accelerate_state()  # this test's accelerator autocasts to bf16, whatever ran before it
    accelerator = make_accelerator(LoopArguments(output_dir=str(tmp_path), report_to="none", mixed_precision="bf16"))
    choose_attention(model, LoopArguments(output_dir=str(tmp_path), attention="auto"), accelerator)
    assert model.config._attn_implementation == "eager"
    assert "attention: eager (auto: bf16 on a CPU with a context of 16 <= 512 tokens" in capsys.readouterr().out
    with torch.no_grad():
        eager = model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(eager[mask.bool()], sdpa[mask.bool()], atol=1e-5)  # the same function
    model.save_pretrained(tmp_path / "saved")
    assert MiniGPTForCausalLM.from_pretrained(tmp_path / "saved").config._attn_implementation == "sdpa"
    choose_attention(model, LoopArguments(output_dir=str(tmp_path), attention="auto"), accelerator)
    assert "attention:" not in capsys.readouterr().out  # chosen once per model (DPO chooses before prepare)
    forced = MiniGPTForCausalLM(config)
    forced.set_attn_implementation("eager")
    choose_attention(forced, LoopArguments(output_dir=str(tmp_path), attention="sdpa"), accelerator)
    assert forced.config._attn_implementation == "sdpa"


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
