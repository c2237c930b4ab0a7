"""Serving many requests: continuous batching (`generate_batch`) against `generate` in a loop.

    python benchmarks/bench_serving.py                                  # gpt2-small shape, 32 requests
    python benchmarks/bench_serving.py --preset tiny --requests 64      # a quick look
    python benchmarks/bench_serving.py --attn_implementation eager      # paged|eager kernel instead of sdpa

Greedy decoding of --new_tokens after prompts of random lengths (--min_prompt to --max_prompt tokens),
three ways, in one process, interleaved (one run of each per repetition, so a busy machine slows all
alike): `generate` on one prompt at a time (what a naive server does), `generate` on all prompts at
once, left-padded (static batching: every row waits for the longest), and `generate_batch`
(continuous batching: requests share one flat batch and a paged KV cache, prefills chunked to
--max_batch_tokens). Tokens/s counts generated tokens only; ratios are the median over repetitions
of each path's tokens/s over the loop's in the same repetition. Every path is checked to give each
request the loop's ids.

The model has random weights (speed does not depend on them) at a MiniGPT preset's shape, fp32,
dropout 0, end-of-text disabled so every request generates exactly --new_tokens.
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import ContinuousBatchingConfig, GenerationConfig, HfArgumentParser

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from modeling_minigpt import PRESETS, MiniGPTConfig, MiniGPTForCausalLM  # noqa: E402
from training.cli import report_error  # noqa: E402

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
    pairs: int = field(default=3, metadata={"help": "Timed repetitions (each runs every path once)."})
    seed: int = field(default=0, metadata={"help": "torch.manual_seed for weights and prompts."})
    threads: int | None = field(
        default=None, metadata={"help": "torch.set_num_threads (default: torch's); 1 is steadier on a busy machine."}
    )

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"--preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        if self.attn_implementation not in ("sdpa", "eager"):
            raise ValueError(f"--attn_implementation must be sdpa or eager, got {self.attn_implementation!r}")
        if min(self.requests, self.min_prompt, self.new_tokens, self.pairs, self.max_batch_tokens) < 1:
            raise ValueError("--requests, --min_prompt, --new_tokens, --pairs and --max_batch_tokens must be >= 1")
        if self.max_prompt < self.min_prompt:
            raise ValueError(f"--max_prompt ({self.max_prompt}) must be >= --min_prompt ({self.min_prompt})")
        context = PRESETS[self.preset]["context_length"]
        if self.max_prompt + self.new_tokens > context:
            raise ValueError(
                f"--max_prompt + --new_tokens = {self.max_prompt + self.new_tokens} is longer than "
                f"{self.preset}'s context_length of {context}"
            )
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}")


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
        (args,) = HfArgumentParser(ServingArguments).parse_args_into_dataclasses(args=argv)
    except ValueError as error:
        return report_error(error)
    print(f"benchmark with {args}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model, prompts = build(args)
    config = GenerationConfig(max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    paging = paging_for(args, prompts)
    runs = {
        PATHS[0]: lambda: run_loop(model, prompts, config),
        PATHS[1]: lambda: run_padded(model, prompts, config),
        PATHS[2]: lambda: run_continuous(model, prompts, config, paging),
    }
    generated = args.requests * args.new_tokens
    with torch.inference_mode():
        outputs = {name: run() for name, run in runs.items()}  # warm-up, and the ids to compare
        rates: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.pairs):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                rates[name].append(generated / (time.perf_counter() - start))
    print(
        f"\n{args.requests} requests, prompts {args.min_prompt}-{args.max_prompt} tokens, {args.new_tokens} new "
        f"tokens each, {args.preset}, {args.attn_implementation}, {torch.get_num_threads()} threads"
    )
    print(f"  {'path':34s} {'tokens/s':>9s} {'vs loop':>8s}  same ids as the loop")
    for name in runs:
        ratio = statistics.median(r / base for r, base in zip(rates[name], rates[PATHS[0]], strict=True))
        same = sum(a == b for a, b in zip(outputs[name], outputs[PATHS[0]], strict=True))
        print(f"  {name:34s} {statistics.median(rates[name]):9.1f} {ratio:7.2f}x  {same}/{args.requests}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
