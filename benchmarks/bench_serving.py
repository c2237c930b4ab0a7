"""Serving many requests: continuous batching (`generate_batch`) against `generate` in a loop.

    python benchmarks/bench_serving.py --threads 1                      # gpt2-small shape, 32 requests (~15 min)
    python benchmarks/bench_serving.py --preset tiny --requests 64      # a quick look
    python benchmarks/bench_serving.py --attn_implementation eager      # paged|eager kernel instead of sdpa

Greedy decoding of --new_tokens after prompts of random lengths (--min_prompt to --max_prompt tokens),
three ways, in one process, interleaved (one run of each per repetition, so a busy machine slows all
alike): `generate` on one prompt at a time (what a naive server does), `generate` on all prompts at
once, left-padded (static batching: every row waits for the longest), and `generate_batch`
(continuous batching: requests share one flat batch and a paged KV cache, prefills chunked to
--max_batch_tokens). Tokens/s counts generated tokens only (median over repetitions); ratios are
the median over repetitions of each path's tokens/s over the loop's in the same repetition. Every
path is checked to give each request the loop's ids.

The model has random weights (speed does not depend on them) at a MiniGPT preset's shape, fp32,
dropout 0, end-of-text disabled so every request generates exactly --new_tokens.
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass, field

import torch
from common import check_at_least, interleaved, load_average, median_ratio, set_threads, threads_field
from transformers import ContinuousBatchingConfig, GenerationConfig

from modeling_minigpt import PRESETS, MiniGPTConfig, MiniGPTForCausalLM
from training.cli import USER_ERRORS, parse_config_args, report_error

PATHS = ("generate, one request at a time", "generate, padded batch", "generate_batch (continuous)")


@dataclass
class ServingArguments:
    preset: str = field(default="gpt2-small", metadata={"help": f"Model shape: one of {', '.join(PRESETS)}."})
    requests: int = field(default=32, metadata={"help": "Number of requests (prompts)."})
    min_prompt: int = field(default=8, metadata={"help": "Shortest prompt, in tokens."})
    max_prompt: int = field(default=96, metadata={"help": "Longest prompt, in tokens."})
    new_tokens: int = field(default=32, metadata={"help": "Tokens generated per request."})
    attn_implementation: str = field(default="sdpa", metadata={"help": "sdpa or eager (paged|eager in batching)."})
    max_batch_tokens: int = field(
        default=256, metadata={"help": "Continuous batching: most tokens (prefill + decode) in one forward."}
    )
    repeats: int = field(default=3, metadata={"help": "Timed repetitions (each runs every path once)."})
    warmup: int = field(default=1, metadata={"help": "Untimed repetitions first (also give the ids compared)."})
    seed: int = field(default=0, metadata={"help": "torch.manual_seed for weights and prompts."})
    threads: int | None = threads_field()

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"--preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        if self.attn_implementation not in ("sdpa", "eager"):
            raise ValueError(f"--attn_implementation must be sdpa or eager, got {self.attn_implementation!r}")
        check_at_least(self, 1, "requests", "min_prompt", "new_tokens", "max_batch_tokens", "repeats", "threads")
        check_at_least(self, 0, "warmup")
        if self.max_prompt < self.min_prompt:
            raise ValueError(f"--max_prompt ({self.max_prompt}) must be >= --min_prompt ({self.min_prompt})")
        context = PRESETS[self.preset]["context_length"]
        if self.max_prompt + self.new_tokens > context:
            raise ValueError(
                f"--max_prompt + --new_tokens = {self.max_prompt + self.new_tokens} is longer than "
                f"{self.preset}'s context_length of {context}"
            )


def build(args: ServingArguments) -> tuple[MiniGPTForCausalLM, list[list[int]]]:
    torch.manual_seed(args.seed)
    config = MiniGPTConfig.from_preset(args.preset, drop_rate=0.0, attn_implementation=args.attn_implementation)
    model = MiniGPTForCausalLM(config).eval()
    lengths = torch.randint(args.min_prompt, args.max_prompt + 1, (args.requests,)).tolist()
    prompts = [torch.randint(0, config.vocab_size, (n,)).tolist() for n in lengths]
    return model, prompts


def run_loop(model, prompts, config) -> list[list[int]]:
    return [model.generate(torch.tensor([p]), generation_config=config)[0, len(p) :].tolist() for p in prompts]


def run_padded(model, prompts, config) -> list[list[int]]:
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return model.generate(ids, attention_mask=mask, generation_config=config)[:, width:].tolist()


def run_continuous(model, prompts, config, paging: ContinuousBatchingConfig) -> list[list[int]]:
    results = model.generate_batch(prompts, generation_config=config, continuous_batching_config=paging)
    return [result.generated_tokens for result in results.values()]


def paging_for(args: ServingArguments, prompts: list[list[int]]) -> ContinuousBatchingConfig:
    """A paged cache that holds every request at once. Left to size itself, it takes a share of
    the machine's free memory: seconds to allocate on the CPU, and nothing to do with serving."""
    page = 16
    pages = sum(-(-(len(p) + args.new_tokens) // page) for p in prompts)
    return ContinuousBatchingConfig(page_size=page, num_blocks=pages + 1, max_batch_tokens=args.max_batch_tokens)


def main(argv: list[str] | None = None) -> int:
    try:
        (args,) = parse_config_args((ServingArguments,), argv, __doc__.split("\n\n")[0])
    except USER_ERRORS as error:
        return report_error(error)
    print(f"benchmark with {args}")
    set_threads(args.threads)
    model, prompts = build(args)
    config = GenerationConfig(max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    paging = paging_for(args, prompts)
    runs = {
        PATHS[0]: lambda: run_loop(model, prompts, config),
        PATHS[1]: lambda: run_padded(model, prompts, config),
        PATHS[2]: lambda: run_continuous(model, prompts, config, paging),
    }
    with torch.inference_mode():
        expected = runs[PATHS[0]]()
        timings = interleaved(runs, args.repeats, args.warmup)
    generated = args.requests * args.new_tokens
    print(
        f"\n{args.requests} requests, prompts {args.min_prompt}-{args.max_prompt} tokens, {args.new_tokens} new "
        f"tokens each, {args.preset}, {args.attn_implementation}, {torch.get_num_threads()} threads"
    )
    print(f"  {'path':34s} {'tokens/s':>9s} {'vs loop':>8s}  same ids as the loop")
    for name in runs:
        rate = generated / statistics.median(timings.wall[name])
        ratio = median_ratio(timings.wall[PATHS[0]], timings.wall[name])
        same = sum(a == b for a, b in zip(timings.results[name], expected, strict=True))
        print(f"  {name:34s} {rate:9.1f} {ratio:7.2f}x  {same}/{args.requests}")
    print(f"\nload average {load_average()} at end (1, 5, 15 min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
