"""Before/after exact match of instruction fine-tuning on the embedded tasks, masked vs unmasked loss.

    python benchmarks/bench_sft.py                                  # pretrain a small base, then both SFT runs
    python benchmarks/bench_sft.py --base_model runs/pretrain/model # start from an existing folder
    python benchmarks/bench_sft.py --pretrain_seconds 30 --sft_steps 40 --num_heldout_tasks 30   # a quick check

Three steps, each a real command of the project (printed, so each can be rerun alone):
1. `scripts/pretrain.py` on CPython's own documentation text (`pydoc_data.topics`, no download):
   a byte-level BPE and a small MiniGPT, for a wall-clock budget (skipped with --base_model);
2. `scripts/sft.py scripts/configs/sft_tasks.yaml` with the loss on the response only;
3. the same with `--mask_prompt false` (the loss on every token).
Both SFT runs evaluate the untuned base first, so one table holds the held-out exact match and
response-token loss before and after, per task kind. Results go to <work_dir>/bench_sft.json
and are printed as a Markdown table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import REPO_ROOT, check_at_least

from modeling_minigpt.files import atomic_write_json, atomic_write_text
from training.cli import USER_ERRORS, parse_config_args, report_error

SFT_CONFIG = REPO_ROOT / "scripts" / "configs" / "sft_tasks.yaml"
# One OpenMP thread unless told otherwise: on this 2-core machine shared with other jobs, two
# threads per process measured 3-5x slower per step as soon as another process competed.
ENV = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "TOKENIZERS_PARALLELISM": "false"}


@dataclass
class BenchArguments:
    work_dir: str = field(
        default="runs/bench_sft", metadata={"help": "Folder for the corpus, the base model and both SFT runs."}
    )
    base_model: str | None = field(
        default=None, metadata={"help": "An existing model folder (with tokenizer) to fine-tune; skips pretraining."}
    )
    pretrain_seconds: float = field(default=180, metadata={"help": "Pretraining wall-clock budget in seconds."})
    vocab_size: int = field(default=2048, metadata={"help": "BPE vocabulary trained on the corpus."})
    emb_dim: int = field(default=128, metadata={"help": "Model width."})
    n_layers: int = field(default=4, metadata={"help": "Transformer blocks."})
    n_heads: int = field(default=4, metadata={"help": "Attention heads."})
    context_length: int = field(
        default=128, metadata={"help": "Context length in tokens (prompts + answers are < 100)."}
    )
    sft_steps: int | None = field(
        default=None, metadata={"help": "SFT optimizer steps (default: the config's max_steps)."}
    )
    num_heldout_tasks: int | None = field(
        default=None, metadata={"help": "Held-out task records (default: the config's)."}
    )
    sft_config: str = field(
        default=str(SFT_CONFIG), metadata={"help": f"SFT YAML config (default: {SFT_CONFIG.relative_to(REPO_ROOT)})."}
    )

    def __post_init__(self) -> None:
        if self.pretrain_seconds <= 0:
            raise ValueError(f"--pretrain_seconds must be > 0, got {self.pretrain_seconds}")
        check_at_least(self, 1, "emb_dim", "n_layers", "n_heads", "context_length", "sft_steps", "num_heldout_tasks")
        if self.base_model is not None and not (Path(self.base_model) / "config.json").is_file():
            raise ValueError(f"--base_model {self.base_model} is not a saved model folder (no config.json)")
        if not Path(self.sft_config).is_file():
            raise ValueError(f"--sft_config {self.sft_config} not found")


def run(command: list[str], log: Path) -> float:
    """Run one project command, its output to `log`; return the wall time. Exit on failure."""
    print("$ " + " ".join(command), flush=True)
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        code = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=ENV).returncode
    seconds = time.perf_counter() - start
    if code != 0:
        sys.exit(
            f"command failed (exit {code}); last lines of {log}:\n" + "\n".join(log.read_text().splitlines()[-30:])
        )
    print(f"  done in {seconds:.0f} s (log: {log})", flush=True)
    return seconds


def pretrain_base(args: BenchArguments, work_dir: Path) -> tuple[Path, float]:
    from pydoc_data.topics import topics

    corpus = work_dir / "pydoc_topics.txt"
    atomic_write_text(corpus, "\n\n".join(topics[k] for k in sorted(topics)))
    out = work_dir / "pretrain"
    command = [
        sys.executable,
        "scripts/pretrain.py",
        "--train_file",
        str(corpus),
        "--split_by",
        "characters",
        "--validation_fraction",
        "0.05",
        "--tokenizer_vocab_size",
        str(args.vocab_size),
        "--preset",
        "tiny",
        "--context_length",
        str(args.context_length),
        "--emb_dim",
        str(args.emb_dim),
        "--n_layers",
        str(args.n_layers),
        "--n_heads",
        str(args.n_heads),
        "--drop_rate",
        "0.0",
        # A time budget rather than a step count: the cosine decay follows the steps that fit.
        "--max_time_seconds",
        str(args.pretrain_seconds),
        "--max_steps",
        "100000",
        "--per_device_batch_size",
        "16",
        "--learning_rate",
        "2e-3",
        "--min_learning_rate",
        "2e-4",
        "--warmup_steps",
        "20",
        "--eval_every",
        "100000",
        "--save_every",
        "100000",
        "--report_to",
        "none",
        "--output_dir",
        str(out),
        "--overwrite",
    ]
    seconds = run(command, work_dir / "pretrain.log")
    return out / "model", seconds


def sft(args: BenchArguments, base: Path, out: Path, mask_prompt: bool) -> tuple[dict, float]:
    command = [
        sys.executable,
        "scripts/sft.py",
        args.sft_config,
        "--model_path",
        str(base),
        "--output_dir",
        str(out),
        "--overwrite",
        "--mask_prompt",
        str(mask_prompt).lower(),
    ]
    if args.sft_steps is not None:
        command += ["--max_steps", str(args.sft_steps)]
    if args.num_heldout_tasks is not None:
        command += ["--num_heldout_tasks", str(args.num_heldout_tasks)]
    seconds = run(command, out.with_suffix(".log"))
    return json.loads((out / "final_metrics.json").read_text()), seconds


def table(masked: dict, unmasked: dict) -> str:
    """Markdown: one row per metric, columns before / after (masked) / after (unmasked)."""
    keys = ["val_exact_match", "val_loss", *sorted(k for k in masked["after"] if k.startswith("exact_match_"))]
    names = {"val_loss": "held-out response loss (nats/token)", "val_exact_match": "held-out exact match (all kinds)"}
    lines = ["| metric | untuned base | SFT, loss on response only | SFT, loss on all tokens |", "|---|---|---|---|"]
    for key in keys:
        name = names.get(key, f"exact match: {key.removeprefix('exact_match_')}")
        lines.append(
            f"| {name} | {masked['before'][key]:.3f} | {masked['after'][key]:.3f} | {unmasked['after'][key]:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    try:
        (args,) = parse_config_args((BenchArguments,), argv, __doc__.split("\n\n")[0])
    except USER_ERRORS as error:
        return report_error(error)
    work_dir = (REPO_ROOT / args.work_dir).resolve() if not Path(args.work_dir).is_absolute() else Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    if args.base_model:
        base, pretrain_seconds = Path(args.base_model).resolve(), None
    else:
        base, pretrain_seconds = pretrain_base(args, work_dir)
    masked, masked_seconds = sft(args, base, work_dir / "sft_masked", mask_prompt=True)
    unmasked, unmasked_seconds = sft(args, base, work_dir / "sft_unmasked", mask_prompt=False)
    if masked["before"] != unmasked["before"]:
        sys.exit(
            "the two runs measured different 'before' numbers: they did not start from the same base and held-out set"
        )

    summary = {
        "base_model": str(base),
        "pretrain_seconds": pretrain_seconds,
        "heldout_records": masked["heldout_records"],
        "masked": {**masked, "wall_seconds": masked_seconds},
        "unmasked": {**unmasked, "wall_seconds": unmasked_seconds},
    }
    atomic_write_json(work_dir / "bench_sft.json", summary)
    print(f"\nbase: {base}" + (f" (pretrained in {pretrain_seconds:.0f} s)" if pretrain_seconds else ""))
    print(
        f"SFT: {masked['steps']} steps each; {masked['heldout_records']} held-out records; "
        f"{masked['train_seconds']:.0f} s (masked) and {unmasked['train_seconds']:.0f} s (unmasked) of training\n"
    )
    print(table(masked, unmasked))
    print(f"\nwritten: {work_dir / 'bench_sft.json'}; generations in {work_dir}/sft_*/heldout_generations.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
