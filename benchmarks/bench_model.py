"""Speed of MiniGPT against Hugging Face's `GPT2LMHeadModel` holding the same weights.

    python benchmarks/bench_model.py --shape tiny                 # training step, tiny shape
    python benchmarks/bench_model.py --shape all --pairs 5        # both shapes (gpt2-small is heavy)
    python benchmarks/bench_model.py --generate --threads 1       # cached greedy generation (~20 min, compiles)
    python benchmarks/bench_model.py --generate --batches 1 --new_tokens 32 --pairs 3   # a quick look
    python benchmarks/bench_model.py --shape tiny --compile       # adds torch.compile'd MiniGPT
    python benchmarks/bench_model.py --shape all --threads 1      # steadier when other jobs share the CPU
    python benchmarks/bench_model.py --shape quickstart --bf16    # adds MiniGPT under bf16 autocast, ratio vs fp32
    python benchmarks/bench_model.py --attention                  # attention alone: bf16 and fp32, 128-1024 tokens
    python benchmarks/bench_model.py --linear                     # one linear layer without gradients: MKL vs oneDNN
    python benchmarks/bench_model.py --int8 --threads 1           # batch-1 decoding: int8 vs fp32, HF, llama.cpp

Training: tokens/s of one step (forward + loss + backward + AdamW) for MiniGPT with sdpa, MiniGPT
with the hand-written eager attention, and `GPT2LMHeadModel` (sdpa), run interleaved (one step
of each per repetition) so a busy machine slows all three alike. Ratios are the median over
repetitions of ours / HF within a repetition. With --bf16 (on a CPU with bf16 instructions) one
more MiniGPT with the same weights trains under bf16 autocast, fp32 master weights, as
`mixed_precision: auto` does, once with sdpa and once with eager attention (what `attention: auto`
picks for bf16 on a CPU), and a second table gives every ratio against fp32 MiniGPT.

Attention (--attention): forward + backward of the attention step alone (`MultiHeadAttention`'s
`_sdpa` and `_eager` on the same queries, keys and values, plain causal) at the gpt2-small head
shape and the quickstart's, from 128 to 1024 tokens, in fp32 and bf16: the measurement behind
`training.run.accelerator.EAGER_BF16_CPU_MAX_CONTEXT`.

Linear (--linear): GB/s of weight read by an fp32 linear layer without gradients at gpt2-small's
weight shapes, for 1, 8 and 128 rows, through MKL (`F.linear`, PyTorch's fp32 CPU default) and
through oneDNN (what `modeling_minigpt.linear` uses for inference): the measurement behind it.

Generation: greedy `generate()` of --new_tokens after 16-token prompts (left-padded rows of
different lengths for batch > 1) at the gpt2-small shape, every path of both models interleaved
in one process (see `generation_paths`), each checked to produce the same ids as HF's default path. ms/step is
the wall time of one decoding step (one new token per row, prefill included), against the memory
floor: the fp32 weight bytes a step must read, over the copy bandwidth measured at start.

Int8 (--int8): batch-1 cached greedy `generate()` of gpt2-small (random weights: the speed does not
depend on them) by HF's default path, MiniGPT's default fp32 path and MiniGPT with int8 linear
layers (`modeling_minigpt.quantize.quantize_int8`), eager and with `compile_decoding=True` (static
cache, compiled one-token step; compiled during the warm-up), interleaved; ms per token against each one's
memory floor (the bytes of weights one step reads over the copy bandwidth). With random weights
the logits are nearly flat, so int8 rounding picks other tokens: the "same ids" column is only
meaningful for the fp32 paths; the int8 accuracy is its perplexity delta on real text
(`scripts/evaluate.py --int8`). Where llama-cpp-python is installed, llama.cpp decodes the same
weights too, from GGUF files in f32 and q8_0 (`training.saved.runtimes.gguf.write_gguf`, with
GPT-2's tokenizer from --gpt2_dir), on as many threads as PyTorch, greedy on its KV cache; its
bytes per step are the GGUF's tensors less `token_embd` (a step reads one row of it).

All models run in fp32 (unless named bf16) with dropout 0.0 (the comparison is about the same
computation; dropout would add random masks to both), from the same `torch.manual_seed`, and the
HF model is the MiniGPT converted with `minigpt_to_gpt2`, so both start from identical weights.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch._dynamo.config
import torch._inductor.config
import torch.nn.functional as F
from common import Timings, interleaved, load_average, median_ratio, set_threads, threads_field
from transformers import CompileConfig

from modeling_minigpt import MiniGPTConfig, MiniGPTForCausalLM, linear
from modeling_minigpt.attention import MultiHeadAttention
from modeling_minigpt.convert import minigpt_to_gpt2
from modeling_minigpt.quantize import int8_available, quantize_int8, quantized_weight_bytes
from training.cli import USER_ERRORS, parse_config_args, report_error

# name -> (model config overrides on top of a preset, batch size, sequence length)
SHAPES: dict[str, tuple[dict, int, int]] = {
    "tiny": (dict(vocab_size=8192, context_length=256, emb_dim=256, n_heads=4, n_layers=4), 8, 256),
    # scripts/configs/quickstart_pretrain.yaml: 4 x 128, the quickstart tokenizer's 2048 ids
    "quickstart": (dict(vocab_size=2048, context_length=128, emb_dim=128, n_heads=4, n_layers=4), 16, 128),
    "gpt2-small": (dict(), 4, 256),
}
GENERATION_PROMPT = 16
ONEDNN = linear.USE_ONEDNN  # as the package decided on import
BF16_TRAINING = ("minigpt-sdpa bf16 autocast", "minigpt-eager bf16 autocast")
# (batch, heads, tokens, head_dim) for --attention: the quickstart's heads, then gpt2-small's
ATTENTION_SHAPES = [(16, 4, 128, 32), (8, 12, 256, 64), (4, 12, 512, 64), (2, 12, 1024, 64)]
# (out, in) of gpt2-small's weights for --linear: Q/K/V/out_proj, fc_in, fc_out, the tied LM head;
# rows: one decoding step at batch 1 and 8, and a prefill or evaluation batch.
LINEAR_SHAPES = [(768, 768), (3072, 768), (768, 3072), (50257, 768)]
LINEAR_ROWS = [1, 8, 128]


DEFAULT_GPT2_DIR = "../shared/data/gpt2"


@dataclass
class BenchArguments:
    shape: str = field(default="tiny", metadata={"help": "Training shape: tiny, quickstart, gpt2-small or all."})
    pairs: int = field(default=5, metadata={"help": "Timed repetitions (each runs every model once)."})
    warmup: int = field(default=1, metadata={"help": "Untimed repetitions first (allocator, kernels, compile)."})
    generate: bool = field(default=False, metadata={"help": "Benchmark cached greedy generation instead of training."})
    attention: bool = field(
        default=False, metadata={"help": "Benchmark the attention paths alone (sdpa, eager; fp32, bf16) instead."}
    )
    linear: bool = field(
        default=False, metadata={"help": "Benchmark an fp32 linear layer alone, MKL against oneDNN, instead."}
    )
    int8: bool = field(
        default=False,
        metadata={
            "help": "Benchmark batch-1 decoding with int8 linear layers (eager, and with compiled decoding: compiled "
            "in the warm-up, ~10 s) against fp32 MiniGPT and HF instead."
        },
    )
    compile: bool = field(
        default=False, metadata={"help": "Also time MiniGPT (sdpa) under torch.compile (training only)."}
    )
    batches: list[int] = field(
        default_factory=lambda: [1, 8], metadata={"help": "Generation batch sizes (--batches 1 8)."}
    )
    new_tokens: int = field(default=128, metadata={"help": "Generation: new tokens per row."})
    gpt2_dir: str = field(
        default=DEFAULT_GPT2_DIR,
        metadata={
            "help": "--int8: GPT-2's encoder.json and vocab.bpe, the tokenizer the llama.cpp GGUF files carry "
            "(without them at the default place, the llama.cpp rows are left out)."
        },
    )
    bf16: bool = field(
        default=False,
        metadata={
            "help": "Also time MiniGPT under bf16 autocast (training) or in bf16 compile+freeze (generation), "
            "if the CPU has bf16 instructions."
        },
    )
    seed: int = field(default=0, metadata={"help": "torch.manual_seed for weights and data."})
    threads: int | None = threads_field()

    def __post_init__(self) -> None:
        if self.shape not in (*SHAPES, "all"):
            raise ValueError(f"--shape must be one of {', '.join(SHAPES)} or all, got {self.shape!r}")
        if self.pairs < 1 or self.warmup < 0:
            raise ValueError(f"--pairs must be >= 1 and --warmup >= 0, got {self.pairs} and {self.warmup}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}")
        if self.generate + self.attention + self.linear + self.int8 > 1:
            raise ValueError("--generate, --attention, --linear and --int8 are separate benchmarks: give one of them")
        if not self.batches or min(self.batches) < 1 or self.new_tokens < 1:
            raise ValueError(f"--batches and --new_tokens must be >= 1, got {self.batches} and {self.new_tokens}")
        # The default folder is absent from a clone without ../shared (the rows are then left out);
        # one given by hand must be there.
        if self.gpt2_dir != DEFAULT_GPT2_DIR and not (Path(self.gpt2_dir) / "vocab.bpe").is_file():
            raise ValueError(f"--gpt2_dir {self.gpt2_dir}: no vocab.bpe there (GPT-2's encoder.json and vocab.bpe)")


def build_models(shape: str, with_compile: bool) -> dict[str, torch.nn.Module]:
    """MiniGPT (sdpa), MiniGPT (eager), optionally compiled MiniGPT, and HF GPT-2 (sdpa), same weights."""
    preset = "gpt2-small" if shape == "gpt2-small" else "tiny"
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


def report(title: str, timings: Timings, tokens: int, reference: str = "hf-gpt2-sdpa") -> None:
    """Tokens/s and speed ratios against `reference` (> 1 means faster than it).

    "median" is the median over repetitions of the ratio within a repetition, the headline
    number. On a busy machine two more views help: the ratio of the fastest runs (the least
    disturbed ones) and the ratio of median CPU seconds (work done, blind to waiting)."""
    print(f"\n{title}")
    print(f"  {'':32s} {'tokens/s':>10s}   {'median':>6s}  {'fastest':>7s}  {'cpu':>5s}   (ratios vs {reference})")
    for name, wall in timings.wall.items():
        rate = tokens / statistics.median(wall)
        median = median_ratio(timings.wall[reference], wall)
        fastest = min(timings.wall[reference]) / min(wall)
        cpu = statistics.median(timings.cpu[reference]) / statistics.median(timings.cpu[name])
        print(f"  {name:32s} {rate:10.1f}   {median:5.2f}x  {fastest:6.2f}x  {cpu:4.2f}x")


def bench_training(shape: str, args: BenchArguments) -> None:
    torch.manual_seed(args.seed)
    models = build_models(shape, args.compile)
    config = models["minigpt-sdpa"].config
    batch, length = SHAPES[shape][1], SHAPES[shape][2]
    ids = torch.randint(0, config.vocab_size, (batch, length))

    with_bf16 = args.bf16 and bf16_is_fast()
    if with_bf16:
        for name, source in zip(BF16_TRAINING, ("minigpt-sdpa", "minigpt-eager"), strict=True):
            models[name] = copy.deepcopy(models[source])
    elif args.bf16:
        print(f"--bf16 skipped: this CPU ({torch.backends.cpu.get_cpu_capability()}) reports no bf16 instructions")
    losses: dict[str, list[float]] = {name: [] for name in models}

    def step(name: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name in BF16_TRAINING):
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
    print(
        f"training step, {shape}: {config.n_layers} layers, {config.emb_dim} wide, {config.n_heads} heads, "
        f"vocab {config.vocab_size}, batch {batch}x{length}, fp32, dropout 0.0, {torch.get_num_threads()} threads, "
        f"load average {load_average()} at start (1, 5, 15 min)"
    )
    timings = interleaved(runs, args.pairs, args.warmup)
    report(f"training step ({shape}, {args.pairs} repetitions)", timings, batch * length)
    if with_bf16:
        report(f"training step ({shape}), against fp32 MiniGPT", timings, batch * length, reference="minigpt-sdpa")
    # Same weights, data and optimiser: every model must follow the same loss curve.
    print("  first-step loss: " + ", ".join(f"{name} {values[0]:.6f}" for name, values in losses.items()))


def copy_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
    """GB/s of a large tensor copy (bytes read + bytes written), the best of `repeats`."""
    src = torch.rand(megabytes * 2**20 // 4)  # touched, so the pages are real memory
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / best / 1e9


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes one decoding step must read: every parameter once (tied tensors count once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def generation_prompts(batch: int, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask), each (batch, GENERATION_PROMPT): random prompts, and for batch > 1
    rows of different lengths, left-padded with id 0 as generate() expects."""
    lengths = [GENERATION_PROMPT - (row * 5) % 8 for row in range(batch)]  # 16, 11, 14, 9, ...
    ids = torch.zeros(batch, GENERATION_PROMPT, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, GENERATION_PROMPT - length :] = torch.randint(1, vocab_size, (length,))
        mask[row, GENERATION_PROMPT - length :] = 1
    return ids, mask


def bf16_is_fast() -> bool:
    """bf16 matmuls beat fp32 only with native bf16 instructions (2.25x on an AVX-512 BF16 CPU,
    35x slower without them): decided from what the CPU reports, never assumed."""
    capabilities = torch.cpu.get_capabilities()
    return torch.backends.cpu.get_cpu_capability() == "AVX512" and bool(
        capabilities.get("avx512_bf16") or capabilities.get("amx_bf16")
    )


# The generation paths, measured for both models:
# - "default": what generate() does out of the box, a DynamicCache and no compilation.
# - "static+compile": transformers' recipe for compiled decoding, a StaticCache (fixed shapes)
#   and the decoding step compiled with fullgraph (generate() compiles by itself only on GPUs;
#   `_compile_all_devices` asks for it on CPU).
# - "compile+freeze": the fastest found here. The whole forward compiled with fullgraph and
#   dynamic shapes (the DynamicCache grows every step), with inductor's freezing: the weights
#   become constants. HF's matmuls (and ours with USE_ONEDNN off) run on weights inductor
#   pre-packs: for MKL at batch 1, for oneDNN when the batch is a dynamic dimension (1.8x MKL's
#   plain matmul at batch 8), with Q/K/V concatenated into one matmul. Ours by default stay on
#   our oneDNN op with plain weights (`modeling_minigpt.linear`), which inductor does not touch.
#   Freezing breaks the StaticCache (it folds the cache's
#   static-address tensors into constants: index out of bounds, torch 2.13 / transformers 5.24),
#   hence the dynamic cache. Inference only: a frozen graph never sees new weights.
STATIC_COMPILE = CompileConfig(fullgraph=True, dynamic=False, mode=None)
STATIC_COMPILE._compile_all_devices = True
FREEZE_OPTIONS = {"freezing": True, "cpp.enable_concat_linear": True}


class GenerationPath(NamedTuple):
    model: torch.nn.Module
    settings: dict  # generate() kwargs
    inductor: dict  # inductor config patch
    reference: str | None  # the HF variant on the same path, for the "vs HF same path" column
    onednn: bool = True  # modeling_minigpt.linear.USE_ONEDNN while it runs


def generation_paths(ours: MiniGPTForCausalLM, hf: torch.nn.Module, with_bf16: bool) -> dict[str, GenerationPath]:
    """Every path of both models. The compiled variants are fresh copies: build them once per batch
    size, or dynamo's limit of 8 graphs per function is soon reached (prefill and decoding, each
    batch size, ...). ", F.linear" marks a path with `modeling_minigpt.linear.USE_ONEDNN` off: the
    default path then runs on MKL and shows what oneDNN's kernel alone is worth, and
    compile+freeze leaves every linear layer to inductor, which packs the weights for MKL at
    batch 1 and for oneDNN when the batch is a dynamic dimension."""

    def compiled_frozen(model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        model = copy.deepcopy(model).to(dtype)
        model.forward = torch.compile(model.forward, fullgraph=True, dynamic=True)
        return model

    static = dict(cache_implementation="static", compile_config=STATIC_COMPILE)
    paths = {
        "hf-gpt2 default": GenerationPath(hf, {}, {}, "hf-gpt2 default"),
        "minigpt default": GenerationPath(ours, {}, {}, "hf-gpt2 default"),
        "minigpt default, F.linear": GenerationPath(ours, {}, {}, "hf-gpt2 default", onednn=False),
        "hf-gpt2 static+compile": GenerationPath(copy.deepcopy(hf), static, {}, "hf-gpt2 static+compile"),
        "minigpt static+compile": GenerationPath(copy.deepcopy(ours), static, {}, "hf-gpt2 static+compile"),
        "hf-gpt2 compile+freeze": GenerationPath(compiled_frozen(hf), {}, FREEZE_OPTIONS, "hf-gpt2 compile+freeze"),
        "minigpt compile+freeze": GenerationPath(compiled_frozen(ours), {}, FREEZE_OPTIONS, "hf-gpt2 compile+freeze"),
        "minigpt compile+freeze, F.linear": GenerationPath(
            compiled_frozen(ours), {}, FREEZE_OPTIONS, "hf-gpt2 compile+freeze", onednn=False
        ),
    }
    if with_bf16:
        paths["minigpt bf16 compile+freeze"] = GenerationPath(
            compiled_frozen(ours, torch.bfloat16), {}, FREEZE_OPTIONS, None
        )
    return paths


def time_generation(
    paths: dict[str, GenerationPath], ids: torch.Tensor, mask: torch.Tensor, greedy: dict, args: BenchArguments
) -> tuple[Timings, dict[str, torch.Tensor]]:
    """Every path's generate() on the same prompts, interleaved; the timings and the ids."""
    outputs: dict[str, torch.Tensor] = {}

    def generate(name: str) -> None:
        path = paths[name]
        linear.USE_ONEDNN = path.onednn and ONEDNN
        try:
            with torch.inference_mode(), torch._inductor.config.patch(path.inductor):
                outputs[name] = path.model.generate(ids, attention_mask=mask, **greedy, **path.settings)
        finally:
            linear.USE_ONEDNN = ONEDNN

    runs = {name: lambda name=name: generate(name) for name in paths}
    return interleaved(runs, args.pairs, args.warmup), outputs


def bench_attention(args: BenchArguments) -> None:
    """ms of one forward + backward of each attention path, interleaved, per shape and dtype."""
    torch.manual_seed(args.seed)
    print(
        f"attention forward + backward (plain causal), {torch.get_num_threads()} threads, "
        f"CPU {torch.backends.cpu.get_cpu_capability()}, load average {load_average()} at start"
    )
    print(f"  {'(batch, heads, tokens, head_dim)':34s} {'dtype':9s} {'sdpa ms':>8s} {'eager ms':>9s}  eager speed-up")
    for batch, heads, tokens, head_dim in ATTENTION_SHAPES:
        config = MiniGPTConfig.from_preset(
            "tiny", emb_dim=heads * head_dim, n_heads=heads, context_length=tokens, drop_rate=0.0
        )
        attention = MultiHeadAttention(config, layer_idx=0)
        for dtype in (torch.float32, torch.bfloat16):
            qkv = [torch.randn(batch, heads, tokens, head_dim, dtype=dtype, requires_grad=True) for _ in range(3)]

            def run(path: Callable, qkv: list[torch.Tensor] = qkv) -> None:
                context = path(*qkv, None)
                context = context[0] if isinstance(context, tuple) else context
                context.sum().backward()

            runs = {
                "sdpa": lambda path=attention._sdpa: run(path),
                "eager": lambda path=attention._eager: run(path),
            }
            timings = interleaved(runs, 5 * args.pairs, max(args.warmup, 1), show=False).wall
            sdpa, eager = (statistics.median(timings[name]) * 1000 for name in ("sdpa", "eager"))
            shape = str((batch, heads, tokens, head_dim))
            print(f"  {shape:34s} {str(dtype)[6:]:9s} {sdpa:8.2f} {eager:9.2f}  {sdpa / eager:5.2f}x")


def apply_each(kernel: Callable, x: torch.Tensor, weights: list[torch.Tensor], bias: torch.Tensor) -> None:
    for weight in weights:
        kernel(x, weight, bias)


def bench_linear(args: BenchArguments) -> None:
    """GB/s of weight read by an fp32 linear layer without gradients: MKL (`F.linear`) against
    oneDNN (`modeling_minigpt.linear`), interleaved. Each timed run goes through enough copies of
    the weight (~256 MB) to leave the caches behind, as a decoding step does."""
    if not ONEDNN:
        print("--linear skipped: modeling_minigpt.linear.USE_ONEDNN is off on this CPU (no x86 SIMD or no oneDNN)")
        return
    print(
        f"fp32 linear, no grad, {torch.get_num_threads()} threads, CPU {torch.backends.cpu.get_cpu_capability()}, "
        f"load average {load_average()} at start"
    )
    print(f"  {'(out, in)':14s} {'rows':>5s} {'MKL GB/s':>9s} {'oneDNN GB/s':>12s}  oneDNN speed-up")
    torch.manual_seed(args.seed)
    for out_features, in_features in LINEAR_SHAPES:
        copies = max(1, (256 << 20) // (out_features * in_features * 4))
        weights = [torch.randn(out_features, in_features) for _ in range(copies)]
        bias = torch.randn(out_features)
        gigabytes = copies * out_features * in_features * 4 / 1e9
        for rows in LINEAR_ROWS:
            x = torch.randn(rows, in_features)
            runs = {
                "mkl": functools.partial(apply_each, F.linear, x, weights, bias),
                "onednn": functools.partial(apply_each, linear._onednn_linear, x, weights, bias),
            }
            with torch.no_grad():
                timings = interleaved(runs, 2 * args.pairs, max(args.warmup, 1), show=False).wall
            mkl, onednn = (statistics.median(timings[name]) for name in ("mkl", "onednn"))
            shape = str((out_features, in_features))
            print(f"  {shape:14s} {rows:5d} {gigabytes / mkl:9.1f} {gigabytes / onednn:12.1f}  {mkl / onednn:5.2f}x")


def bench_generation(args: BenchArguments) -> None:
    # Dynamo counts graphs per code object, and transformers' deprecate_kwarg wrapper is one code
    # object shared by both models' forwards: the default limit (8) is reached across paths.
    torch._dynamo.config.recompile_limit = 64
    torch.manual_seed(args.seed)
    models = build_models("gpt2-small", with_compile=False)
    ours, hf = models["minigpt-sdpa"].eval(), models["hf-gpt2-sdpa"].eval()
    with_bf16 = args.bf16 and bf16_is_fast()
    if args.bf16 and not with_bf16:
        print(f"--bf16 skipped: this CPU ({torch.backends.cpu.get_cpu_capability()}) reports no bf16 instructions")
    reference = "hf-gpt2 default"
    print(
        f"greedy generation, gpt2-small, {GENERATION_PROMPT}-token prompts, {args.new_tokens} new tokens, "
        f"{torch.get_num_threads()} threads, CPU {torch.backends.cpu.get_cpu_capability()}, "
        f"load average {load_average()} at start (1, 5, 15 min)"
    )
    print(
        "MiniGPT's fp32 linear layers without gradients: "
        + (
            "oneDNN (modeling_minigpt.linear)"
            if ONEDNN
            else "F.linear (modeling_minigpt.linear.USE_ONEDNN is off on this CPU)"
        )
    )
    greedy = dict(
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )
    bandwidth = copy_bandwidth()
    for batch in args.batches:
        paths = generation_paths(ours, hf, with_bf16)
        ids, mask = generation_prompts(batch, ours.config.vocab_size)
        print(f"\nbatch {batch}" + (" (left-padded prompts)" if batch > 1 else "") + "; warm-up compiles")
        timings, outputs = time_generation(paths, ids, mask, greedy, args)
        # A floor is a lower bound: it takes the best bandwidth seen so far (the least disturbed copy).
        bandwidth = max(bandwidth, copy_bandwidth())
        floor_ms = 1000 * weight_bytes(ours) / (bandwidth * 1e9)
        report(f"generation, batch {batch} ({args.pairs} repetitions)", timings, batch * args.new_tokens, reference)
        print(
            f"  memory floor: {weight_bytes(ours) / 1e6:.0f} MB of fp32 weights / {bandwidth:.1f} GB/s copy "
            f"bandwidth (best seen in this run) = {floor_ms:.1f} ms per decoding step"
        )
        print(f"  {'':32s} {'ms/step':>8s} {'x floor':>8s} {'vs HF same path':>16s}  ids == {reference}")
        for name, wall in timings.wall.items():
            step_ms = 1000 * statistics.median(wall) / args.new_tokens
            same_path = paths[name].reference
            versus = f"{median_ratio(timings.wall[same_path], wall):15.2f}x" if same_path else f"{'-':>16s}"
            identical = torch.equal(outputs[name], outputs[reference])
            print(f"  {name:32s} {step_ms:8.1f} {step_ms / floor_ms:7.2f}x {versus}  {identical}")
    print(f"\nload average {load_average()} at end (1, 5, 15 min)")


def llama_cpp_decoders(
    model: MiniGPTForCausalLM, args: BenchArguments, folder: Path
) -> dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], int]]:
    """name -> (batch-1 greedy decoding by llama.cpp, bytes one step reads) for GGUF f32 and q8_0
    files of `model` written into `folder`; empty (with a note) without llama-cpp-python or --gpt2_dir."""
    gpt2 = Path(args.gpt2_dir)
    if importlib.util.find_spec("llama_cpp") is None or not (gpt2 / "vocab.bpe").is_file():
        print(f"  (no llama.cpp rows: llama-cpp-python not installed, or no GPT-2 tokenizer in {gpt2})")
        return {}
    import gguf
    from llama_cpp import Llama

    from tokenization import load_gpt2_tokenizer
    from training.saved.runtimes.gguf import write_gguf

    tokenizer = load_gpt2_tokenizer(gpt2 / "encoder.json", gpt2 / "vocab.bpe")
    decoders = {}
    for gguf_type in ("f32", "q8_0"):
        path = write_gguf(model, tokenizer, folder / f"{gguf_type}.gguf", gguf_type, "bench")
        step_bytes = sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors if t.name != "token_embd.weight")
        threads = torch.get_num_threads()
        llm = Llama(
            str(path),
            n_ctx=GENERATION_PROMPT + args.new_tokens,
            logits_all=True,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )

        def decode(ids: torch.Tensor, llm: Llama = llm) -> torch.Tensor:
            out = ids[0].tolist()
            llm.reset()
            llm.eval(out)
            for step in range(args.new_tokens):
                out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
                if step < args.new_tokens - 1:  # as generate(): the last token is not run through the model
                    llm.eval(out[-1:])
            return torch.tensor([out])

        decoders[f"llama.cpp {gguf_type}"] = (decode, step_bytes)
    return decoders


def bench_int8(args: BenchArguments) -> None:
    """Batch-1 cached greedy decoding of gpt2-small: HF default, MiniGPT fp32, MiniGPT int8, interleaved."""
    if not int8_available():
        print(f"--int8 skipped: this PyTorch has no x86 int8 kernels ({torch.backends.quantized.supported_engines})")
        return
    torch.manual_seed(args.seed)
    models = build_models("gpt2-small", with_compile=False)
    ours, hf = models["minigpt-sdpa"].eval(), models["hf-gpt2-sdpa"].eval()
    int8 = quantize_int8(copy.deepcopy(ours))
    paths = {
        "hf-gpt2 default": hf,
        "minigpt default (fp32)": ours,
        "minigpt int8": int8,
        "minigpt int8, compiled decoding": quantize_int8(copy.deepcopy(ours), compile_decoding=True),
    }
    step_bytes = {name: weight_bytes(model) for name, model in paths.items()}
    step_bytes["minigpt int8"] = step_bytes["minigpt int8, compiled decoding"] = quantized_weight_bytes(int8)
    reference = "hf-gpt2 default"
    greedy = dict(
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )
    ids, mask = generation_prompts(1, ours.config.vocab_size)
    print(
        f"int8 decoding, gpt2-small, batch 1, {GENERATION_PROMPT}-token prompt, {args.new_tokens} new tokens, "
        f"{torch.get_num_threads()} threads, CPU {torch.backends.cpu.get_cpu_capability()}, "
        f"load average {load_average()} at start (1, 5, 15 min)"
    )
    bandwidth = copy_bandwidth()
    outputs: dict[str, torch.Tensor] = {}

    def generate(name: str) -> None:
        with torch.inference_mode():
            outputs[name] = paths[name].generate(ids, attention_mask=mask, **greedy)

    runs = {name: functools.partial(generate, name) for name in paths}
    with tempfile.TemporaryDirectory() as folder:
        for name, (decode, nbytes) in llama_cpp_decoders(ours, args, Path(folder)).items():
            runs[name] = functools.partial(lambda name, decode: outputs.__setitem__(name, decode(ids)), name, decode)
            step_bytes[name] = nbytes
        timings = interleaved(runs, args.pairs, args.warmup)
    bandwidth = max(bandwidth, copy_bandwidth())
    report(f"int8 decoding, batch 1 ({args.pairs} repetitions)", timings, args.new_tokens, reference)
    print(f"  copy bandwidth {bandwidth:.1f} GB/s (best seen in this run)")
    print(f"  {'':32s} {'ms/token':>8s} {'MB/step':>8s} {'floor ms':>9s} {'x floor':>8s}  same ids as {reference}")
    for name, wall in timings.wall.items():
        step_ms = 1000 * statistics.median(wall) / args.new_tokens
        floor_ms = 1000 * step_bytes[name] / (bandwidth * 1e9)
        new = slice(ids.shape[1], None)
        same = (outputs[name][:, new] == outputs[reference][:, new]).float().mean().item()
        print(
            f"  {name:32s} {step_ms:8.1f} {step_bytes[name] / 1e6:8.0f} {floor_ms:9.1f} {step_ms / floor_ms:7.2f}x  "
            f"{same:.0%} of new tokens"
        )
    print(f"\nload average {load_average()} at end (1, 5, 15 min)")


def main(argv: list[str] | None = None) -> int:
    try:
        (args,) = parse_config_args((BenchArguments,), argv, __doc__.split("\n\n")[0])
    except USER_ERRORS as error:  # a bad value, refused in BenchArguments.__post_init__
        return report_error(error)
    print(f"benchmark with {args}")
    set_threads(args.threads)
    if args.generate:
        bench_generation(args)
    elif args.attention:
        bench_attention(args)
    elif args.linear:
        bench_linear(args)
    elif args.int8:
        bench_int8(args)
    else:
        for shape in SHAPES if args.shape == "all" else [args.shape]:
            bench_training(shape, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
