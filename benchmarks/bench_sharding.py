"""What sharding buys: measured at a small shape on this machine, estimated per rank at GPT-2 shapes.

    python benchmarks/bench_sharding.py                       # small shape 4 x 256, batch 8 x 256, 5 pairs
    python benchmarks/bench_sharding.py --ranks 1 2 8 64 --micro_batch 8
    python benchmarks/bench_sharding.py --device_tflops 312    # also scale to another device's peak (A100 bf16)

Measured (one process, fp32, the shape of --layers/--emb_dim/--vocab/--context):
  - training-step tokens/s (forward + loss + backward + AdamW), each step interleaved with a
    reference matmul of the same FLOP count at a large, efficient size, so a busy machine slows
    both alike: the printed efficiency is the median over pairs of step FLOP/s / matmul FLOP/s;
  - bytes of training state per parameter (parameters + gradients + AdamW moments, the real
    tensors after a step: the 16 bytes/param the estimate assumes);
  - activation bytes kept for backward (saved-tensor hooks, parameters excluded), split into a
    per-block part and a head part by measuring 1 and 2 blocks.

Estimated, per rank, for N ranks, at gpt2-small and gpt2-xl (exact parameter counts from the
model built on the meta device), with these assumptions:
  - training state 16 bytes/param fp32, divided by N under FSDP2 / ZeRO-3; plus, gathered while
    in use, the root group (embeddings + tied head + final norm, kept after forward) and two
    blocks (the one computing and the one prefetched), 4 bytes/param;
  - activations scale as measured: per block linearly in tokens x emb_dim (sdpa keeps no T x T
    matrix: the coefficients came out the same at context 128, 256 and 512), head linearly in
    tokens x vocab; per rank, the micro-batch --micro_batch x context;
    no activation checkpointing (it would keep ~1 tensor per block instead);
  - tokens/s per rank = (measured efficiency x this machine's matmul FLOP/s, or --device_tflops)
    / FLOPs per token (6 x non-embedding params + 6 x vocab x emb_dim for the head + 12 x layers
    x context x emb_dim for attention). Same efficiency as the small shape (on CPU larger
    matmuls run closer to peak, so this tends to be low); communication not included: FSDP moves
    ~12 x (N-1)/N bytes per parameter per step per rank (two fp32 all-gathers, one reduce-scatter),
    listed so it can be set against a link's bandwidth. Global tokens/s = N x per rank if that
    traffic overlaps with compute.
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass, field

import torch
from common import check_at_least, interleaved, median_ratio, set_threads, threads_field

from modeling_minigpt import MiniGPTConfig, MiniGPTForCausalLM
from training.cli import USER_ERRORS, parse_config_args, report_error

TARGETS = ("gpt2-small", "gpt2-xl")


@dataclass
class BenchArguments:
    layers: int = field(default=4, metadata={"help": "Blocks of the measured shape."})
    emb_dim: int = field(default=256, metadata={"help": "emb_dim of the measured shape (4 heads: a multiple of 4)."})
    vocab: int = field(default=8192, metadata={"help": "vocab_size of the measured shape."})
    context: int = field(default=256, metadata={"help": "Tokens per sequence when measuring."})
    batch: int = field(default=8, metadata={"help": "Sequences per measured step."})
    pairs: int = field(default=5, metadata={"help": "Timed (step, reference matmul) pairs, after one warm-up pair."})
    ranks: list[int] = field(
        default_factory=lambda: [1, 2, 8, 64], metadata={"help": "N, the ranks of each estimate (--ranks 1 2 8 64)."}
    )
    micro_batch: int = field(default=8, metadata={"help": "Sequences of 1024 tokens per rank in the estimates."})
    device_tflops: float | None = field(
        default=None, metadata={"help": "Also estimate for a device of this peak TFLOP/s (e.g. 312: A100 bf16)."}
    )
    threads: int | None = threads_field()

    def __post_init__(self) -> None:
        names = ("layers", "emb_dim", "vocab", "context", "batch", "pairs", "micro_batch", "ranks", "threads")
        check_at_least(self, 1, *names)
        if self.emb_dim % 4:
            raise ValueError(f"--emb_dim must be a multiple of 4 (4 heads), got {self.emb_dim}")
        if not self.ranks:
            raise ValueError("--ranks needs at least one number of ranks")
        if self.device_tflops is not None and self.device_tflops <= 0:
            raise ValueError(f"--device_tflops must be > 0, got {self.device_tflops}")


def small_config(args: BenchArguments, layers: int) -> MiniGPTConfig:
    return MiniGPTConfig(
        vocab_size=args.vocab,
        context_length=args.context,
        emb_dim=args.emb_dim,
        n_heads=4,
        n_layers=layers,
        drop_rate=0.0,
    )


def flops_per_token(config: MiniGPTConfig, non_embedding_params: int) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward; PaLM appendix B's count)."""
    C, L, T, V = config.emb_dim, config.n_layers, config.context_length, config.vocab_size
    return 6 * non_embedding_params + 6 * V * C + 12 * L * T * C


def non_embedding(model: MiniGPTForCausalLM) -> int:
    embeddings = model.model.tok_emb.weight.numel() + model.model.pos_emb.weight.numel()
    return sum(p.numel() for p in model.parameters()) - embeddings


def batch_of(config: MiniGPTConfig, batch: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(
        0, config.vocab_size, (batch, config.context_length + 1), generator=torch.Generator().manual_seed(0)
    )
    return {"input_ids": ids[:, :-1], "shift_labels": ids[:, 1:].contiguous()}


def saved_activation_bytes(model: MiniGPTForCausalLM, batch: dict[str, torch.Tensor]) -> int:
    """Bytes autograd keeps for backward in one forward, each storage once, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(**batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def state_bytes_per_param(model: MiniGPTForCausalLM, optimizer: torch.optim.Optimizer) -> float:
    """Parameters + gradients + optimizer state, counted from the tensors themselves."""
    params = list(model.parameters())
    total = sum(p.nbytes + (p.grad.nbytes if p.grad is not None else 0) for p in params)
    total += sum(v.nbytes for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))
    return total / sum(p.numel() for p in params)


def measure(args: BenchArguments) -> dict[str, float]:
    torch.manual_seed(0)
    config = small_config(args, args.layers)
    model = MiniGPTForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = batch_of(config, args.batch)
    tokens = args.batch * args.context
    step_flops = flops_per_token(config, non_embedding(model)) * tokens
    # The reference: square fp32 matmuls of the step's FLOP count, at a size CPUs run near peak.
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    matmuls = max(1, round(step_flops / (2 * n**3)))

    def step() -> None:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)

    def reference() -> None:
        for _ in range(matmuls):
            torch.mm(a, b)

    # One warm-up pair: allocator, kernels, AdamW state.
    seconds = interleaved({"step": step, "reference": reference}, args.pairs, warmup=1, show=False).wall
    step_seconds, reference_seconds = seconds["step"], seconds["reference"]
    # About the same FLOP count on both sides of a pair, so their time ratio is the efficiency.
    efficiency = median_ratio(reference_seconds, step_seconds)
    bytes_per_param = state_bytes_per_param(model, optimizer)

    one, two = (MiniGPTForCausalLM(small_config(args, layers)) for layers in (1, 2))
    per_block = saved_activation_bytes(two, batch) - saved_activation_bytes(one, batch)
    head = saved_activation_bytes(one, batch) - per_block
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "tokens_per_second": tokens / statistics.median(step_seconds),
        "efficiency": efficiency * step_flops / (2 * n**3 * matmuls),  # matmuls is rounded: correct for it
        "matmul_flops": 2 * n**3 * matmuls / statistics.median(reference_seconds),
        "bytes_per_param": bytes_per_param,
        # coefficients the estimates scale: bytes per (token x emb_dim) per block, per (token x vocab) for the head
        "block_coefficient": per_block / (tokens * args.emb_dim),
        "head_coefficient": head / (tokens * args.vocab),
        "activation_bytes": saved_activation_bytes(model, batch),
    }


def estimate(preset: str, ranks: int, micro_batch: int, measured: dict[str, float]) -> dict[str, float]:
    config = MiniGPTConfig.from_preset(preset, drop_rate=0.0)
    with torch.device("meta"):  # exact parameter counts, no memory
        model = MiniGPTForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    block = sum(p.numel() for p in model.model.trf_blocks[0].parameters())
    root = params - config.n_layers * block
    tokens = micro_batch * config.context_length
    activations = tokens * (
        measured["block_coefficient"] * config.emb_dim * config.n_layers
        + measured["head_coefficient"] * config.vocab_size
    )
    sharded_state = 16 * params / ranks
    gathered = 0 if ranks == 1 else 4 * (root + 2 * block)
    return {
        "params": params,
        "ddp_gb": (16 * params + activations) / 1e9,
        "fsdp_gb": (sharded_state + gathered + activations) / 1e9,
        "state_gb": sharded_state / 1e9,
        "activation_gb": activations / 1e9,
        "flops_per_token": flops_per_token(config, non_embedding(model)),
        "comm_gb_per_step": 12 * params * (ranks - 1) / ranks / 1e9,
    }


def main(argv: list[str] | None = None) -> int:
    try:
        (args,) = parse_config_args((BenchArguments,), argv, __doc__.split("\n\n")[0])
    except USER_ERRORS as error:
        return report_error(error)
    set_threads(args.threads)
    measured = measure(args)
    print(
        f"measured, one process, {torch.get_num_threads()} threads, fp32: {args.layers} x {args.emb_dim} model "
        f"({measured['params'] / 1e6:.1f}M params, vocab {args.vocab}), batch {args.batch} x {args.context}"
    )
    print(
        f"  training step: {measured['tokens_per_second']:,.0f} tokens/s "
        f"= {measured['efficiency']:.1%} of this machine's fp32 matmul rate "
        f"({measured['matmul_flops'] / 1e9:.0f} GFLOP/s, "
        "median over interleaved pairs)"
    )
    print(f"  training state: {measured['bytes_per_param']:.2f} bytes/param (parameters + gradients + AdamW moments)")
    print(
        f"  activations kept for backward: {measured['activation_bytes'] / 1e6:.0f} MB = "
        f"{measured['block_coefficient']:.1f} bytes x tokens x emb_dim per block "
        f"+ {measured['head_coefficient']:.1f} bytes x tokens x vocab for the head"
    )

    devices = [("this CPU", measured["matmul_flops"])]
    if args.device_tflops:
        devices.append((f"{args.device_tflops:g} TFLOP/s device", args.device_tflops * 1e12))
    print(
        f"\nestimated per rank, micro-batch {args.micro_batch} x 1024 tokens, fp32 state, no activation checkpointing:"
    )
    header = (
        f"{'shape':<11} {'params':>7} {'N':>4} {'DDP GB':>7} {'FSDP2 GB':>9} {'state':>7} {'activ.':>7} "
        f"{'comm GB/step':>12}"
    )
    header += "".join(f" {'tok/s per rank / all, ' + name:>36}" for name, _ in devices)
    print(header)
    for preset in TARGETS:
        for ranks in args.ranks:
            row = estimate(preset, ranks, args.micro_batch, measured)
            line = (
                f"{preset:<11} {row['params'] / 1e6:>6.0f}M {ranks:>4} {row['ddp_gb']:>7.1f} {row['fsdp_gb']:>9.1f} "
                f"{row['state_gb']:>7.2f} {row['activation_gb']:>7.1f} {row['comm_gb_per_step']:>12.1f}"
            )
            for _, flops in devices:
                per_rank = flops * measured["efficiency"] / row["flops_per_token"]
                line += f" {f'{per_rank:,.0f} / {ranks * per_rank:,.0f}':>36}"
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
