"""Muon + AdamW against AdamW alone, at equal steps and at equal time, on the quickstart's model.

    python benchmarks/bench_optimizer.py                      # 300 steps each, then AdamW at equal time (~15 min quiet)
    python benchmarks/bench_optimizer.py --steps 100 --threads 1   # a quick look on a busy machine

The quickstart's pretraining (4 layers x 128, context 128, batch 16, a 2048-token BPE trained here
on the embedded corpus's training text) from the same initial weights and the same batches in
the same order, with the quickstart's settings: AdamW 3e-3 -> 3e-4, betas (0.9, 0.95), weight
decay 0.1, 20 warmup steps; Muon at 0.02 on the block matrices, AdamW for the rest (`--optimizer
muon`). Both train in one process, one step of each in turn, so load from other processes slows
both alike; each step is timed and the cost ratio is the median over steps of Muon's time / AdamW's
time in the same round. Held-out bits per byte (the embedded corpus's held-out topics, the number
the quickstart prints) every --eval_every steps.

Equal time: AdamW then trains again from the same start for round(steps x cost ratio) steps, its
cosine over that longer horizon, i.e. the steps it gets in the time Muon needed for --steps.
"""

from __future__ import annotations

import copy
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from common import check_at_least, load_average, median_ratio, set_threads, threads_field

from modeling_minigpt import MiniGPTConfig, MiniGPTForCausalLM
from tokenization import train_bpe
from tokenization.corpus import write_embedded_corpus
from training.cli import USER_ERRORS, parse_config_args, report_error
from training.data.collate import collate_windows
from training.data.windows import build_lm_datasets
from training.evaluation.metrics import evaluate_texts
from training.run.arguments import LoopArguments
from training.run.loop import make_train_dataloader
from training.run.optim import make_optimizer
from training.run.schedule import lr_factor


@dataclass
class BenchArguments:
    steps: int = field(default=300, metadata={"help": "Optimizer steps of each optimizer (the quickstart: 300)."})
    eval_every: int = field(default=100, metadata={"help": "Held-out bits per byte every N steps and at the end."})
    mixed_precision: Literal["no", "bf16"] = field(
        default="no", metadata={"help": "no (fp32) or bf16 (autocast), for both."}
    )
    threads: int | None = threads_field()
    seed: int = field(default=1337, metadata={"help": "Weights and data order."})

    def __post_init__(self) -> None:
        check_at_least(self, 1, "steps", "eval_every", "threads")


def loop_settings(optimizer: str, steps: int) -> LoopArguments:
    """The quickstart's pretraining settings (scripts/configs/quickstart_pretrain.yaml)."""
    return LoopArguments(
        output_dir="unused",
        optimizer=optimizer,
        max_steps=steps,
        learning_rate=3e-3,
        min_learning_rate=3e-4,
        muon_learning_rate=0.02,
        warmup_steps=20,
        weight_decay=0.1,
    )


class Trainer:
    """One model, its optimizer and schedule: `step(batch)` trains once and returns its wall time."""

    def __init__(self, model: MiniGPTForCausalLM, args: LoopArguments, bf16: bool):
        self.model, self.args, self.bf16 = model.train(), args, bf16
        self.optimizer = make_optimizer(model, args)
        self.steps = 0

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        start = time.perf_counter()
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lr_factor(self.args, self.steps, 0.0)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        return time.perf_counter() - start


def batches(dataset, batch_size: int, seed: int):
    """The same shuffled batches, epoch after epoch, for every trainer."""
    loader = make_train_dataloader(dataset, batch_size, collate_windows, seed)
    while True:
        yield from loader


def main(argv: list[str] | None = None) -> int:
    try:
        (args,) = parse_config_args((BenchArguments,), argv, __doc__.split("\n\n")[0])
    except USER_ERRORS as error:
        return report_error(error)
    set_threads(args.threads)
    bf16 = args.mixed_precision == "bf16"
    print(f"benchmark with {args}; {torch.get_num_threads()} threads; load average {load_average()} (1, 5, 15 min)")
    folder = Path(tempfile.mkdtemp(prefix="bench_optimizer_"))
    train_txt, validation_txt = write_embedded_corpus(folder / "data")
    tokenizer = train_bpe([train_txt], 2048, output_dir=folder / "tokenizer", show_progress=False, model_max_length=128)
    validation = validation_txt.read_text(encoding="utf-8")
    windows = build_lm_datasets(str(train_txt), tokenizer, context_length=128, validation_fraction=0.0)["train"]

    torch.manual_seed(args.seed)
    config = MiniGPTConfig.from_preset(
        "tiny",
        vocab_size=len(tokenizer),
        context_length=128,
        emb_dim=128,
        n_heads=4,
        n_layers=4,
        drop_rate=0.0,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    initial = MiniGPTForCausalLM(config)

    def bits_per_byte(model: MiniGPTForCausalLM) -> float:
        model.eval()
        value = evaluate_texts(model, tokenizer, [validation], n_bootstrap=1).to_dict()["bits_per_byte"]
        model.train()
        return value

    trainers = {
        name: Trainer(copy.deepcopy(initial), loop_settings(name, args.steps), bf16) for name in ("adamw", "muon")
    }
    times: dict[str, list[float]] = {name: [] for name in trainers}
    curve: dict[str, dict[int, float]] = {name: {} for name in trainers}
    data = batches(windows, 16, args.seed)
    for step in range(1, args.steps + 1):
        batch = next(data)
        for name, trainer in trainers.items():
            times[name].append(trainer.step(batch))
        if step % args.eval_every == 0 or step == args.steps:
            for name, trainer in trainers.items():
                curve[name][step] = bits_per_byte(trainer.model)
            print(f"  step {step}: " + ", ".join(f"{n} {c[step]:.3f} bits/byte" for n, c in curve.items()), flush=True)
    ratio = median_ratio(times["muon"], times["adamw"])

    equal_time_steps = round(args.steps * ratio)
    print(f"AdamW alone for {equal_time_steps} steps (the time Muon took for {args.steps}) ...", flush=True)
    longer = Trainer(copy.deepcopy(initial), loop_settings("adamw", equal_time_steps), bf16)
    data = batches(windows, 16, args.seed)
    for _ in range(equal_time_steps):
        longer.step(next(data))
    equal_time = bits_per_byte(longer.model)

    print(f"\nMuon + AdamW vs AdamW, quickstart model, {args.mixed_precision}, measured under load {load_average()}")
    print(f"  cost of a step, Muon / AdamW (median over {args.steps} rounds): {ratio:.3f}x")
    print(f"  {'step':>6s} {'adamw':>8s} {'muon':>8s}   held-out bits per byte (equal steps)")
    for step in curve["adamw"]:
        print(f"  {step:6d} {curve['adamw'][step]:8.3f} {curve['muon'][step]:8.3f}")
    print(
        f"  equal time: AdamW {equal_time_steps} steps {equal_time:.3f} bits/byte vs Muon {args.steps} steps "
        f"{curve['muon'][args.steps]:.3f}"
    )
    shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
