"""One GPU check: is MiniGPT correct and fast on one NVIDIA GPU? One table, in under 8 minutes on an H100.

    python benchmarks/gpu_check.py                    # on a machine with one CUDA GPU
    python benchmarks/gpu_check.py --dry_run          # on a CPU, tiny shapes, ~1 minute: what the test suite runs
    python benchmarks/gpu_check.py --output_json gpu_check.json

Needs, offline: torch >= 2.4 with CUDA (and triton, for the compiled rows: an ML GPU image has both),
and this package installed with its dependencies (transformers >= 5.24, accelerate >= 1.0, datasets,
tokenizers); `pip install -e .` from a checkout, or the project's wheel plus those wheels.

Correctness, on a tiny MiniGPT (each row states its tolerance):
- CUDA fp32 logits against CPU fp32 logits of the same weights (TF32 off for this row);
- 50 bf16-autocast training steps against the same 50 steps in fp32, from the same weights and batches;
- a torch.compile'd model against eager for 10 fp32 training steps;
- the pretraining job (`scripts/pretrain.py`, bf16) cut back to a mid-run checkpoint and resumed:
  the losses after the cut against the uninterrupted run's;
- the same job under Accelerate's own FSDP2 (`--config_file scripts/configs/accelerate/fsdp2.yaml`, one
  process) against the plain launch, fp32.
Speed, gpt2-small (124M) at context 1024 under bf16 autocast, fused AdamW, in the same process:
- training tokens/s and MFU (nanoGPT's estimate: 6N + 12·L·H·Q·T FLOPs per token, against the card's
  dense bf16 peak) of MiniGPT eager and compiled, and of `GPT2LMHeadModel` holding the same weights,
  eager and compiled; peak GPU memory of each;
- cached greedy generation tokens/s at batch 1 and 32, MiniGPT against `GPT2LMHeadModel`, with
  identical greedy ids checked; peak memory.
Targets (issue 23): training >= 1.2x HF and MFU >= 40 % (compiled, H100); generation at batch 32 >= 1.0x HF.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from modeling_minigpt import MiniGPTConfig, MiniGPTForCausalLM
from modeling_minigpt.convert import minigpt_to_gpt2
from modeling_minigpt.files import atomic_write_json
from training.cli import parse_config_args, report_error

REPO_ROOT = Path(__file__).resolve().parents[1]

# Dense bf16 tensor-core peak of the card, FLOP/s (NVIDIA's data sheets, without sparsity).
PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}


@dataclass
class GPUCheckArguments:
    dry_run: bool = field(
        default=False,
        metadata={"help": "Run every row on the CPU at tiny shapes (seconds, no GPU): checks the script itself."},
    )
    train_batch_size: int = field(
        default=16, metadata={"help": "Sequences per training step in the speed rows (context 1024)."}
    )
    train_steps: int = field(default=20, metadata={"help": "Timed training steps per model (after 3 warm-up steps)."})
    new_tokens: int = field(default=128, metadata={"help": "Generated tokens per row in the generation rows."})
    output_json: str | None = field(default=None, metadata={"help": "Also write the table's rows to this JSON file."})

    def __post_init__(self) -> None:
        for name in ("train_batch_size", "train_steps", "new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.output_json and Path(self.output_json).exists():  # checked before minutes of GPU time
            raise ValueError(f"--output_json {self.output_json} exists: name a new file (it is never replaced)")


@dataclass
class Row:
    section: str
    check: str
    value: str
    reference: str = ""
    result: str = ""  # "ok", "FAIL", a ratio, or why it was skipped


# ----------------------------------------------------------------------------- shared pieces


def tiny_config(vocab_size: int = 512, context_length: int = 128) -> MiniGPTConfig:
    return MiniGPTConfig.from_preset(
        "tiny", vocab_size=vocab_size, context_length=context_length, emb_dim=64, n_heads=4, n_layers=4, drop_rate=0.0
    )


def corpus_text() -> str:
    """English that ships with Python (no download): CPython's pydoc topics."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def byte_batches(n: int, batch: int, length: int, vocab: int, seed: int = 0) -> list[torch.Tensor]:
    """`n` batches of real text as byte ids (below `vocab`), random windows: no tokenizer needed."""
    data = torch.tensor(list(corpus_text().encode("utf-8")), dtype=torch.long) % vocab
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - length, (n, batch), generator=generator)
    return [torch.stack([data[s : s + length] for s in row]) for row in starts]


def train_losses(
    model: torch.nn.Module, batches: list[torch.Tensor], device: torch.device, bf16: bool, compiled: bool = False
) -> list[float]:
    """AdamW steps over `batches` (labels = inputs, the model shifts), the loss of each step."""
    model = model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=device.type == "cuda" or None)
    if compiled:
        model.compile()
    losses = []
    for ids in batches:
        ids = ids.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def flops_per_token(model: torch.nn.Module, context: int) -> float:
    """nanoGPT's `estimate_mfu`: 6 FLOPs per parameter (position embeddings left out) plus attention's 12·L·H·Q·T."""
    config = model.config
    n = sum(p.numel() for p in model.parameters())
    n -= (
        config.n_positions * config.n_embd if hasattr(config, "n_positions") else config.context_length * config.emb_dim
    )
    layers = getattr(config, "n_layer", None) or config.n_layers
    heads = getattr(config, "n_head", None) or config.n_heads
    width = getattr(config, "n_embd", None) or config.emb_dim
    return 6 * n + 12 * layers * heads * (width // heads) * context


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16.items() if key in name), None)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> str:
    return f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else "n/a (CPU)"


# ----------------------------------------------------------------------------- correctness


def check_logits(device: torch.device, rows: list[Row]) -> None:
    torch.manual_seed(0)
    model = MiniGPTForCausalLM(tiny_config()).eval()
    ids = byte_batches(1, 4, 128, 512)[0]
    with torch.no_grad():
        cpu = model(input_ids=ids).logits
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False  # full fp32 on both sides for this row
        try:
            for implementation in ("eager", "sdpa"):
                other = copy.deepcopy(model).to(device)
                other.set_attn_implementation(implementation)
                diff = (other(input_ids=ids.to(device)).logits.cpu() - cpu).abs().max().item()
                ok = diff <= 1e-4
                rows.append(
                    Row(
                        "correctness",
                        f"{device.type} fp32 logits ({implementation}) vs CPU",
                        f"max |diff| {diff:.1e}",
                        "tolerance 1e-4",
                        "ok" if ok else "FAIL",
                    )
                )
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32


def check_bf16_tracks_fp32(device: torch.device, steps: int, rows: list[Row]) -> None:
    if device.type == "cpu" and not torch.cpu.get_capabilities().get("avx512_bf16"):
        rows.append(Row("correctness", "bf16 autocast tracks fp32", "skipped", "", "this CPU has no native bf16"))
        return
    torch.manual_seed(0)
    model = MiniGPTForCausalLM(tiny_config())
    batches = byte_batches(steps, 8, 128, 512, seed=1)
    fp32 = train_losses(copy.deepcopy(model), batches, device, bf16=False)
    bf16 = train_losses(copy.deepcopy(model), batches, device, bf16=True)
    diff = max(abs(a - b) for a, b in zip(fp32, bf16, strict=True))
    rows.append(
        Row(
            "correctness",
            f"{steps} bf16 steps track fp32",
            f"max |loss diff| {diff:.1e} nats",
            f"fp32 loss {fp32[0]:.2f} -> {fp32[-1]:.2f}; tolerance 0.05",
            "ok" if diff <= 0.05 else "FAIL",
        )
    )


def check_compiled(device: torch.device, steps: int, rows: list[Row]) -> None:
    torch.manual_seed(0)
    model = MiniGPTForCausalLM(tiny_config())
    batches = byte_batches(steps, 8, 128, 512, seed=2)
    eager = train_losses(copy.deepcopy(model), batches, device, bf16=False)
    compiled = train_losses(copy.deepcopy(model), batches, device, bf16=False, compiled=True)
    diff = max(abs(a - b) for a, b in zip(eager, compiled, strict=True))
    tolerance = 1e-3 if device.type == "cuda" else 1e-4  # inductor reorders fp32 sums; CUDA adds TF32/atomics
    rows.append(
        Row(
            "correctness",
            f"compiled = eager ({steps} fp32 steps)",
            f"max |loss diff| {diff:.1e}",
            f"tolerance {tolerance:.0e}",
            "ok" if diff <= tolerance else "FAIL",
        )
    )


def _pretrain(folder: Path, corpus: Path, steps: int, extra: list[str], launcher: list[str]) -> list[tuple[int, float]]:
    """scripts/pretrain.py as a user runs it (tiny model, its own tokenizer); (step, loss) of its log."""
    flags = [
        "--train_file", str(corpus), "--output_dir", str(folder), "--tokenizer_vocab_size", "512",
        "--context_length", "128", "--emb_dim", "64", "--n_heads", "4", "--n_layers", "4", "--drop_rate", "0.0",
        "--max_steps", str(steps), "--save_every", str(steps // 2), "--eval_every", "1000", "--warmup_steps", "2",
        "--per_device_batch_size", "8", "--learning_rate", "1e-3", "--log_every", "1", "--report_to", "none",
        "--sample_tokens", "4", "--eval_batches", "2", "--cache_dir", str(folder.parent / "cache"), *extra,
    ]  # fmt: skip
    command = [*launcher, str(REPO_ROOT / "scripts" / "pretrain.py"), *flags]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:6])} ... failed:\n{done.stderr[-2000:]}")
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]


def _launch(config: str | None = None) -> list[str]:
    base = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1"]
    base += ["--dynamo_backend", "no", "--mixed_precision", "no"]
    return [*base, "--config_file", config] if config else base


def check_resume_and_fsdp(device: torch.device, work: Path, steps: int, rows: list[Row]) -> None:
    corpus = work / "corpus.txt"
    corpus.write_text(corpus_text()[:200_000], encoding="utf-8")
    precision = "bf16" if device.type == "cuda" else "no"
    full = work / "full"
    losses = _pretrain(full, corpus, steps, ["--mixed_precision", precision], _launch())
    cut = work / "cut"
    shutil.copytree(full, cut)
    for checkpoint in (cut / "checkpoints").iterdir():
        if checkpoint.name.startswith("step_") and int(checkpoint.name[5:]) > steps // 2:
            shutil.rmtree(checkpoint)
    shutil.rmtree(cut / "model")
    resumed = _pretrain(cut, corpus, steps, ["--mixed_precision", precision, "--resume"], _launch())
    diff = max(abs(a - b) for (_, a), (_, b) in zip(resumed, losses, strict=True))
    same_steps = [s for s, _ in resumed] == [s for s, _ in losses]
    rows.append(
        Row(
            "correctness",
            f"checkpoint at step {steps // 2} resumes ({precision})",
            f"max |loss diff| {diff:.1e}",
            f"steps {steps // 2 + 1}-{steps} vs uninterrupted; tolerance 1e-4",
            "ok" if same_steps and diff <= 1e-4 else "FAIL",
        )
    )
    if device.type != "cuda":
        rows.append(
            Row("correctness", "Accelerate FSDP2 (1 GPU) = plain", "skipped", "", "Accelerate's FSDP plugin needs CUDA")
        )
        return
    plain = _pretrain(work / "plain", corpus, steps, ["--mixed_precision", "no"], _launch())
    config = str(REPO_ROOT / "scripts" / "configs" / "accelerate" / "fsdp2.yaml")
    sharded = _pretrain(work / "fsdp2", corpus, steps, ["--mixed_precision", "no"], _launch(config))
    diff = max(abs(a - b) for (_, a), (_, b) in zip(sharded, plain, strict=True))
    loads = MiniGPTForCausalLM.from_pretrained(work / "fsdp2" / "model") is not None
    rows.append(
        Row(
            "correctness",
            "Accelerate FSDP2 (1 GPU) = plain (fp32)",
            f"max |loss diff| {diff:.1e}",
            "tolerance 1e-3; final folder loads",
            "ok" if diff <= 1e-3 and loads else "FAIL",
        )
    )


# ----------------------------------------------------------------------------- speed


def _time_steps(step: Callable[[], None], device: torch.device, warmup: int, steps: int) -> float:
    """Median seconds of one call of `step` after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    synchronize(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def speed_training(device: torch.device, args: GPUCheckArguments, rows: list[Row]) -> None:
    dry = args.dry_run
    overrides = dict(vocab_size=512, context_length=64, emb_dim=64, n_heads=4, n_layers=2) if dry else {}
    config = MiniGPTConfig.from_preset("tiny" if dry else "gpt2-small", drop_rate=0.0, **overrides)
    context, batch = config.context_length, (2 if dry else args.train_batch_size)
    torch.manual_seed(0)
    minigpt = MiniGPTForCausalLM(config)
    hf = minigpt_to_gpt2(minigpt)
    bf16 = device.type == "cuda" or bool(torch.cpu.get_capabilities().get("avx512_bf16"))
    ids = byte_batches(1, batch, context, config.vocab_size)[0].to(device)
    peak = peak_flops(device)
    results = {}
    variants = [("MiniGPT", minigpt, False), ("GPT2LMHeadModel", hf, False)]
    if not dry:  # compiling gpt2-small takes minutes on a CPU; --compile is tested on CPU in the suite
        variants += [("MiniGPT compiled", minigpt, True), ("GPT2LMHeadModel compiled", hf, True)]
    for name, template, compiled in variants:
        model = copy.deepcopy(template).to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda" or None)
        if compiled:
            model.compile()

        def step(model=model, optimizer=optimizer, ids=ids) -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        reset_peak(device)
        seconds = _time_steps(step, device, warmup=1 if dry else 3, steps=2 if dry else args.train_steps)
        tokens_per_second = batch * context / seconds
        mfu = flops_per_token(model, context) * tokens_per_second / peak if peak else None
        results[name] = tokens_per_second
        rows.append(
            Row(
                "training",
                f"{name} ({'bf16' if bf16 else 'fp32'}, {batch}x{context})",
                f"{tokens_per_second:,.0f} tok/s",
                f"MFU {mfu:.1%}" if mfu else "MFU n/a",
                peak_gib(device),
            )
        )
        del model, optimizer
    for ours, theirs in (("MiniGPT", "GPT2LMHeadModel"), ("MiniGPT compiled", "GPT2LMHeadModel compiled")):
        if ours in results and theirs in results:
            ratio = results[ours] / results[theirs]
            rows.append(
                Row(
                    "training",
                    f"{ours} / {theirs}",
                    f"{ratio:.2f}x",
                    "target >= 1.2x (compiled)",
                    "ok" if ratio >= 1.2 or "compiled" not in ours else "below target",
                )
            )


def speed_generation(device: torch.device, args: GPUCheckArguments, rows: list[Row]) -> None:
    dry = args.dry_run
    overrides = dict(vocab_size=512, context_length=64, emb_dim=64, n_heads=4, n_layers=2) if dry else {}
    config = MiniGPTConfig.from_preset("tiny" if dry else "gpt2-small", drop_rate=0.0, **overrides)
    torch.manual_seed(0)
    minigpt = MiniGPTForCausalLM(config).eval()
    hf = minigpt_to_gpt2(minigpt).eval()
    new_tokens, prompt = (4 if dry else args.new_tokens), (8 if dry else 32)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for batch in (1, 2) if dry else (1, 32):
        ids = byte_batches(1, batch, prompt, config.vocab_size, seed=3)[0].to(device)
        outputs, speeds = {}, {}
        for name, template in (("MiniGPT", minigpt), ("GPT2LMHeadModel", hf)):
            model = copy.deepcopy(template).to(device=device, dtype=dtype)

            def generate(model=model, name=name, ids=ids, outputs=outputs) -> None:
                outputs[name] = model.generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                    do_sample=False, pad_token_id=0,
                )  # fmt: skip

            reset_peak(device)
            with torch.no_grad():
                seconds = _time_steps(generate, device, warmup=1, steps=1 if dry else 3)
            speeds[name] = batch * new_tokens / seconds
            rows.append(
                Row(
                    "generation",
                    f"{name} greedy, batch {batch} ({str(dtype)[6:]})",
                    f"{speeds[name]:,.0f} tok/s",
                    "",
                    peak_gib(device),
                )
            )
            del model
        same = torch.equal(outputs["MiniGPT"], outputs["GPT2LMHeadModel"])
        ratio = speeds["MiniGPT"] / speeds["GPT2LMHeadModel"]
        target = "target >= 1.0x" if batch > 1 else ""
        rows.append(
            Row(
                "generation",
                f"MiniGPT / GPT2LMHeadModel, batch {batch}",
                f"{ratio:.2f}x",
                f"{target}; greedy ids {'identical' if same else 'DIFFER'}".strip("; "),
                "ok" if same and (ratio >= 1.0 or batch == 1) else ("FAIL" if not same else "below target"),
            )
        )


# ----------------------------------------------------------------------------- the table


def format_table(rows: list[Row]) -> str:
    header = ("section", "check", "measured", "reference / tolerance", "result")
    cells = [header, *((r.section, r.check, r.value, r.reference, r.result) for r in rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c[i].ljust(widths[i]) for i in range(len(header))) + " |" for c in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def describe_environment(device: torch.device) -> str:
    import accelerate
    import transformers

    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
    versions = (
        f"torch {torch.__version__}, transformers {transformers.__version__}, accelerate {accelerate.__version__}"
    )
    return f"{card}; {versions}; {time.strftime('%Y-%m-%d')}"


def run_check(args: GPUCheckArguments) -> list[Row]:
    if not args.dry_run and not torch.cuda.is_available():
        raise ValueError("no CUDA GPU is visible to torch: run on a GPU machine, or pass --dry_run for the CPU check")
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as the training jobs set it (training.run.accelerator)
    print(describe_environment(device), flush=True)
    rows: list[Row] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        for name, check in (
            ("logits", lambda: check_logits(device, rows)),
            ("bf16", lambda: check_bf16_tracks_fp32(device, 5 if args.dry_run else 50, rows)),
            ("compile", lambda: check_compiled(device, 10, rows) if not args.dry_run else rows.append(
                Row("correctness", "compiled = eager", "skipped", "", "dry run: tests/training/run/test_accelerator.py")
            )),
            ("resume + FSDP2", lambda: check_resume_and_fsdp(device, Path(work), 6 if args.dry_run else 20, rows)),
            ("training speed", lambda: speed_training(device, args, rows)),
            ("generation speed", lambda: speed_generation(device, args, rows)),
        ):  # fmt: skip
            print(f"[{time.perf_counter() - started:5.0f} s] {name}", flush=True)
            try:
                check()
            except Exception as error:  # one failed row must not hide the others
                rows.append(Row("error", name, f"{type(error).__name__}: {str(error)[:300]}", "", "FAIL"))
    print(f"[{time.perf_counter() - started:5.0f} s] done\n")
    return rows


def main(argv: list[str] | None = None) -> int:
    try:
        (args,) = parse_config_args((GPUCheckArguments,), argv, description=__doc__.split("\n\n")[0])
        rows = run_check(args)
    except Exception as error:
        return report_error(error)
    print(format_table(rows))
    if args.output_json:
        atomic_write_json(args.output_json, [vars(r) for r in rows])
    return 1 if any(r.result == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
