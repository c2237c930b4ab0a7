"""Overhead of `training.run.loop.train_loop` against a bare forward/backward/step loop, same model.

    python benchmarks/bench_loop.py                          # 4 x 128 model, context 128, batch 16 x 2 (~2-4 min)
    python benchmarks/bench_loop.py --steps 5 --repeats 2   # a quick check

Both loops train the same model on the same random token windows with the same gradient
accumulation. The bare loop slices a pre-built tensor and calls forward, backward, step and
zero_grad, nothing else. `train_loop` adds everything a real run has: a shuffled DataLoader
over a `datasets.Dataset` with `collate_windows`, Accelerate's accumulate/clip/reduce, the
learning-rate schedule, the NaN check, tqdm, metrics.jsonl and TensorBoard logging every
`--log_every` steps. The variants alternate (A B A B ...), and the overhead is the median over
pairs of the ratio of neighbouring segments, so that load from other processes, which drifts
over minutes, hits both sides of each ratio alike. Goal: overhead under 5 %.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
from accelerate.utils import set_seed
from common import check_at_least, load_average, median_ratio

from modeling_minigpt import MiniGPTConfig, MiniGPTForCausalLM
from training.cli import USER_ERRORS, parse_config_args, report_error
from training.data.collate import collate_windows
from training.run.accelerator import make_accelerator
from training.run.arguments import LoopArguments
from training.run.loop import MetricsLog, TrainState, make_train_dataloader, train_loop
from training.run.optim import build_optimizer

WINDOWS = 512  # random token windows both loops draw their batches from


@dataclass
class BenchArguments:
    n_layers: int = field(default=4, metadata={"help": "Transformer blocks."})
    emb_dim: int = field(default=128, metadata={"help": "Model width."})
    n_heads: int = field(default=4, metadata={"help": "Attention heads."})
    context_length: int = field(default=128, metadata={"help": "Tokens per window."})
    vocab_size: int = field(default=1024, metadata={"help": "Vocabulary of the random token windows."})
    batch_size: int = field(default=16, metadata={"help": "Sequences per micro-batch."})
    accumulation: int = field(default=2, metadata={"help": "Micro-batches per optimizer step."})
    steps: int = field(default=10, metadata={"help": "Optimizer steps per timed segment."})
    repeats: int = field(default=9, metadata={"help": "Timed segments per variant (alternating)."})
    log_every: int = field(default=10, metadata={"help": "train_loop logs every N steps."})

    def __post_init__(self) -> None:
        names = ("n_layers", "emb_dim", "n_heads", "context_length", "vocab_size", "batch_size", "accumulation")
        check_at_least(self, 1, *names, "steps", "repeats", "log_every")
        if self.emb_dim % self.n_heads:
            raise ValueError(f"--emb_dim must be a multiple of --n_heads, got {self.emb_dim} and {self.n_heads}")
        if self.batch_size >= WINDOWS:
            raise ValueError(f"--batch_size must be below {WINDOWS} (the windows drawn from), got {self.batch_size}")


def build_model(args: BenchArguments) -> MiniGPTForCausalLM:
    set_seed(0)
    config = MiniGPTConfig.from_preset(
        "tiny",
        vocab_size=args.vocab_size,
        context_length=args.context_length,
        emb_dim=args.emb_dim,
        n_heads=args.n_heads,
        n_layers=args.n_layers,
        drop_rate=0.0,
    )
    return MiniGPTForCausalLM(config)


def bare_segment(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, windows: torch.Tensor, args: BenchArguments
) -> float:
    """Seconds for `args.steps` optimizer steps of the plainest possible loop."""
    model.train()
    start = time.perf_counter()
    for step in range(args.steps):
        for micro in range(args.accumulation):
            i = (step * args.accumulation + micro) * args.batch_size % (len(windows) - args.batch_size)
            batch = windows[i : i + args.batch_size]  # (B, T + 1)
            loss = model(input_ids=batch[:, :-1].contiguous(), shift_labels=batch[:, 1:].contiguous()).loss
            (loss / args.accumulation).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    try:
        (args,) = parse_config_args((BenchArguments,), argv, __doc__.split("\n\n")[0])
    except USER_ERRORS as error:
        return report_error(error)
    windows = torch.randint(
        0, args.vocab_size, (WINDOWS, args.context_length + 1), generator=torch.Generator().manual_seed(0)
    )
    with tempfile.TemporaryDirectory() as out:
        loop_args = LoopArguments(
            output_dir=out,
            max_steps=1,
            per_device_batch_size=args.batch_size,
            gradient_accumulation_steps=args.accumulation,
            warmup_steps=10,
            log_every=args.log_every,
            eval_every=10**9,
            save_every=10**9,
            report_to="tensorboard",
        )
        accelerator = make_accelerator(loop_args)
        loop_model = build_model(args)
        optimizer = build_optimizer(loop_model, 1e-3, 0.1)
        # A datasets.Dataset, as in pretraining: its per-row access is part of the loop's data cost.
        dataset = datasets.Dataset.from_dict({"input_ids": windows.tolist()})
        loader = make_train_dataloader(dataset, args.batch_size, collate_windows, seed=0)
        loop_model, optimizer, loader = accelerator.prepare(loop_model, optimizer, loader)
        state = TrainState()
        accelerator.register_for_checkpointing(state)
        metrics = MetricsLog(Path(out) / "metrics.jsonl", enabled=accelerator.is_main_process)
        accelerator.init_trackers("bench")

        bare_model = build_model(args)
        bare_optimizer = torch.optim.AdamW(bare_model.parameters(), lr=1e-3)

        def loop_segment(steps: int) -> float:
            before = state.train_seconds
            # save_every is out of reach, but the loop always checkpoints its last step: that
            # happens after the clock stops, so train_seconds measures the steps alone.
            segment_args = LoopArguments(**{**vars(loop_args), "max_steps": state.step + steps})
            train_loop(accelerator, loop_model, optimizer, loader, segment_args, state, metrics)
            return state.train_seconds - before

        print(
            f"model {args.n_layers} x {args.emb_dim}, context {args.context_length}, vocab {args.vocab_size}; "
            f"batch {args.batch_size} x {args.accumulation} accumulation; torch threads {torch.get_num_threads()}; "
            f"load average {load_average()} (1, 5, 15 min)"
        )
        bare_segment(bare_model, bare_optimizer, windows, dataclasses.replace(args, steps=3))  # warm-up
        loop_segment(3)
        times: dict[str, list[float]] = {"bare": [], "train_loop": []}
        for _ in range(args.repeats):
            times["bare"].append(bare_segment(bare_model, bare_optimizer, windows, args))
            times["train_loop"].append(loop_segment(args.steps))
        accelerator.end_training()

    tokens = args.steps * args.accumulation * args.batch_size * args.context_length
    for name, seconds in times.items():
        median = statistics.median(seconds)
        print(
            f"{name:<11} {args.steps / median:7.2f} steps/s  {tokens / median:9,.0f} tokens/s  "
            f"(segments: {', '.join(f'{s:.2f}' for s in seconds)} s)"
        )
    ratios = [loop / bare for loop, bare in zip(times["train_loop"], times["bare"], strict=True)]
    print(
        f"train_loop overhead vs bare loop: {median_ratio(times['train_loop'], times['bare']) - 1:+.1%} "
        f"(median of {len(ratios)} paired segments; pairs range {min(ratios) - 1:+.1%} to {max(ratios) - 1:+.1%}; "
        "goal: < 5%)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
