"""Speed of MiniGPT against Hugging Face's `GPT2LMHeadModel` holding the same weights.

    python scripts/bench_model.py --shape tiny                 # training step, tiny shape
    python scripts/bench_model.py --shape all --pairs 5        # both shapes (gpt2-small is heavy)
    python scripts/bench_model.py --generate                   # cached greedy generation only
    python scripts/bench_model.py --shape tiny --compile       # adds torch.compile'd MiniGPT
    python scripts/bench_model.py --shape all --threads 1      # steadier when other jobs share the CPU

Training: tokens/s of one step (forward + loss + backward + AdamW) for MiniGPT with sdpa, MiniGPT
with the hand-written eager attention, and `GPT2LMHeadModel` (sdpa), run interleaved (one step
of each per repetition) so a busy machine slows all three alike. Ratios are the median over
repetitions of ours / HF within a repetition. Generation: `generate()` of 128 new tokens after a
16-token prompt, batch 1, at the gpt2-small shape, for both models.

All models run in fp32 with dropout 0.0 (the comparison is about the same computation; dropout
would add random masks to both), from the same `torch.manual_seed`, and the HF model is the
MiniGPT converted with `minigpt_to_gpt2`, so both start from identical weights.
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from transformers import HfArgumentParser

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from modeling_minigpt import MiniGPTConfig, MiniGPTForCausalLM  # noqa: E402
from modeling_minigpt.convert import minigpt_to_gpt2  # noqa: E402

# name -> (model config overrides on top of a preset, batch size, sequence length)
SHAPES: dict[str, tuple[dict, int, int]] = {
    "tiny": (dict(vocab_size=8192, context_length=256, emb_dim=256, n_heads=4, n_layers=4), 8, 256),
    "gpt2-small": (dict(), 4, 256),
}
GENERATION_PROMPT, GENERATION_NEW_TOKENS = 16, 128


@dataclass
class BenchArguments:
    shape: str = field(default="tiny", metadata={"help": "Training shape: tiny, gpt2-small or all."})
    pairs: int = field(default=5, metadata={"help": "Timed repetitions (each runs every model once)."})
    warmup: int = field(default=1, metadata={"help": "Untimed repetitions first (allocator, kernels, compile)."})
    generate: bool = field(default=False, metadata={"help": "Benchmark cached greedy generation instead of training."})
    compile: bool = field(
        default=False, metadata={"help": "Also time MiniGPT (sdpa) under torch.compile (training only)."}
    )
    seed: int = field(default=0, metadata={"help": "torch.manual_seed for weights and data."})
    threads: int | None = field(
        default=None,
        metadata={"help": "torch.set_num_threads (default: torch's). 1 gives steadier ratios on a busy machine."},
    )

    def __post_init__(self) -> None:
        if self.shape not in (*SHAPES, "all"):
            raise ValueError(f"--shape must be one of {', '.join(SHAPES)} or all, got {self.shape!r}")
        if self.pairs < 1 or self.warmup < 0:
            raise ValueError(f"--pairs must be >= 1 and --warmup >= 0, got {self.pairs} and {self.warmup}")


def build_models(shape: str, with_compile: bool) -> dict[str, torch.nn.Module]:
    """MiniGPT (sdpa), MiniGPT (eager), optionally compiled MiniGPT, and HF GPT-2 (sdpa), same weights."""
    preset = "tiny" if shape == "tiny" else "gpt2-small"
    config = MiniGPTConfig.from_preset(preset, **SHAPES[shape][0], drop_rate=0.0, attn_implementation="sdpa")
    ours = MiniGPTForCausalLM(config)
    eager = copy.deepcopy(ours)
    eager.set_attn_implementation("eager")
    models = {"minigpt-sdpa": ours, "minigpt-eager": eager}
    if with_compile:
        models["minigpt-compiled"] = torch.compile(copy.deepcopy(ours))
    hf = minigpt_to_gpt2(ours)
    hf.set_attn_implementation("sdpa")
    models["hf-gpt2-sdpa"] = hf
    return models


@dataclass
class Timings:
    """Wall-clock and process CPU seconds of each run, per model."""

    wall: dict[str, list[float]]
    cpu: dict[str, list[float]]


def interleaved(runs: dict[str, Callable[[], object]], pairs: int, warmup: int) -> Timings:
    """Time each callable once per repetition, in turn; warm-up repetitions are dropped."""
    timings = Timings({name: [] for name in runs}, {name: [] for name in runs})
    for rep in range(warmup + pairs):
        line = []
        for name, run in runs.items():
            wall, cpu = time.perf_counter(), time.process_time()
            run()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            line.append(f"{name} {wall:.2f}s")
            if rep >= warmup:
                timings.wall[name].append(wall)
                timings.cpu[name].append(cpu)
        label = "warm-up" if rep < warmup else f"{rep + 1 - warmup}/{pairs}"
        print(f"  [{label}] " + ", ".join(line), flush=True)
    return timings


def report(title: str, timings: Timings, tokens: int, reference: str = "hf-gpt2-sdpa") -> None:
    """Tokens/s and speed ratios against `reference` (> 1 means faster than it).

    "median" is the median over repetitions of the ratio within a repetition, the headline
    number. On a busy machine two more views help: the ratio of the fastest runs (the least
    disturbed ones) and the ratio of median CPU seconds (work done, blind to waiting)."""
    print(f"\n{title}")
    print(f"  {'':18s} {'tokens/s':>10s}   {'median':>6s}  {'fastest':>7s}  {'cpu':>5s}   (ratios vs {reference})")
    for name, wall in timings.wall.items():
        rate = tokens / statistics.median(wall)
        median = statistics.median(r / t for t, r in zip(wall, timings.wall[reference]))
        fastest = min(timings.wall[reference]) / min(wall)
        cpu = statistics.median(timings.cpu[reference]) / statistics.median(timings.cpu[name])
        print(f"  {name:18s} {rate:10.1f}   {median:5.2f}x  {fastest:6.2f}x  {cpu:4.2f}x")


def bench_training(shape: str, args: BenchArguments) -> None:
    torch.manual_seed(args.seed)
    models = build_models(shape, args.compile)
    config = models["minigpt-sdpa"].config
    batch, length = SHAPES[shape][1], SHAPES[shape][2]
    ids = torch.randint(0, config.vocab_size, (batch, length))

    losses: dict[str, list[float]] = {name: [] for name in models}

    def step(name: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses[name].append(loss.item())

    runs = {}
    for name, model in models.items():
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        runs[name] = lambda name=name, model=model, optimizer=optimizer: step(name, model, optimizer)
    print(f"training step, {shape}: {config.n_layers} layers, {config.emb_dim} wide, {config.n_heads} heads, "
          f"vocab {config.vocab_size}, batch {batch}x{length}, fp32, dropout 0.0, {torch.get_num_threads()} threads")
    timings = interleaved(runs, args.pairs, args.warmup)
    report(f"training step ({shape}, {args.pairs} repetitions)", timings, batch * length)
    # Same weights, data and optimiser: every model must follow the same loss curve.
    print("  first-step loss: " + ", ".join(f"{name} {values[0]:.6f}" for name, values in losses.items()))


def bench_generation(args: BenchArguments) -> None:
    torch.manual_seed(args.seed)
    # No compiled variant: `generate` on a compiled wrapper runs the uncompiled module, and the
    # cache grows every step, which would recompile. No eager variant either: with one new query
    # per step the two attention paths differ little, and each run is slow.
    models = build_models("gpt2-small", with_compile=False)
    del models["minigpt-eager"]
    prompt = torch.randint(0, models["minigpt-sdpa"].config.vocab_size, (1, GENERATION_PROMPT))
    greedy = dict(
        max_new_tokens=GENERATION_NEW_TOKENS,
        min_new_tokens=GENERATION_NEW_TOKENS,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )
    outputs: dict[str, torch.Tensor] = {}

    def generate(name: str, model: torch.nn.Module) -> None:
        with torch.inference_mode():
            outputs[name] = model.generate(prompt, **greedy)

    runs = {}
    for name, model in models.items():
        model.eval()
        runs[name] = lambda name=name, model=model: generate(name, model)
    print(f"cached greedy generation, gpt2-small, batch 1, {GENERATION_PROMPT}-token prompt, "
          f"{GENERATION_NEW_TOKENS} new tokens, fp32, {torch.get_num_threads()} threads")
    timings = interleaved(runs, args.pairs, args.warmup)
    report(f"generation ({args.pairs} repetitions)", timings, GENERATION_NEW_TOKENS)
    for name, times in timings.wall.items():
        print(f"  {name:18s} {1000 * statistics.median(times) / GENERATION_NEW_TOKENS:6.1f} ms/token (prefill included)")
    reference = outputs["hf-gpt2-sdpa"]
    same = all(torch.equal(out, reference) for out in outputs.values())
    print(f"  generated ids identical across models: {same}")


def main(argv: list[str] | None = None) -> None:
    (args,) = HfArgumentParser(BenchArguments).parse_args_into_dataclasses(args=argv)
    print(f"benchmark with {args}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.generate:
        bench_generation(args)
        return
    for shape in SHAPES if args.shape == "all" else [args.shape]:
        bench_training(shape, args)


if __name__ == "__main__":
    main()
