"""Tiny runs and their outputs: pretraining settings and flags, a saved base model, metrics, scripts."""

from __future__ import annotations

import importlib.util
import json
import runpy
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from accelerate.state import AcceleratorState, GradientState

from helpers.processes import SUBPROCESS_ENV, run_checked
from modeling_minigpt import MiniGPTConfig, MiniGPTForCausalLM
from training.jobs.pretrain import DataArguments, ModelArguments
from training.run.arguments import LoopArguments

REPO_ROOT = Path(__file__).resolve().parents[2]
PRETRAIN_SCRIPT = REPO_ROOT / "scripts" / "pretrain.py"


TINY_MODEL = dict(preset="tiny", context_length=32, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.1)


TINY_LOOP = dict(
    max_steps=20,
    per_device_batch_size=8,
    learning_rate=3e-3,
    min_learning_rate=3e-4,
    warmup_steps=4,
    log_every=1,
    eval_every=10,
    save_every=5,
    keep_last=2,
    report_to="tensorboard",
    mixed_precision="no",  # the same numbers on every CPU (auto would pick bf16 where it is native)
)


# The fine-tuning jobs' tiny runs (SFT, DPO): 6 steps from a saved tiny base, no tracker.
FINETUNE_LOOP = {
    **TINY_LOOP,
    "max_steps": 6,
    "warmup_steps": 2,
    "eval_every": 100,
    "save_every": 100,
    "report_to": "none",
}


def reset_accelerate_state() -> None:
    """Forget Accelerate's process-wide state, which refuses a second mixed precision in one process
    (tests pick fp32 for numbers, bf16 where that path is tested, and scripts default to auto)."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def argument_groups(defaults: dict[type, dict[str, Any]], overrides: dict[str, Any]) -> tuple:
    """One instance of each argument dataclass, from `defaults`; each override goes to the class with that field."""
    groups = {cls: dict(values) for cls, values in defaults.items()}
    for key, value in overrides.items():
        groups[next(cls for cls in groups if key in cls.__dataclass_fields__)][key] = value
    return tuple(cls(**values) for cls, values in groups.items())


def tiny_args(output_dir: Path, corpus: Path, tokenizer: Path | None, cache: Path, **overrides):
    """(ModelArguments, DataArguments, LoopArguments) of a tiny pretraining run."""
    data = dict(
        train_file=str(corpus),
        tokenizer_path=str(tokenizer) if tokenizer else None,
        split_by="characters",
        tokenizer_vocab_size=400,
        eval_batches=2,
        eval_batch_size=8,
        sample_tokens=8,
        cache_dir=str(cache),
    )
    loop = dict(TINY_LOOP, output_dir=str(output_dir))
    return argument_groups({ModelArguments: TINY_MODEL, DataArguments: data, LoopArguments: loop}, overrides)


def script_flags(output_dir: Path, corpus: Path, tokenizer: Path, cache: Path, **overrides) -> list[str]:
    """The same tiny run as command-line flags for scripts/pretrain.py."""
    model, data, loop = tiny_args(output_dir, corpus, tokenizer, cache, **overrides)
    flags = []
    for group in (model, data, loop):
        for name, value in vars(group).items():
            if value is not None and value is not False:
                flags += [f"--{name}", str(value)]
    return flags


def run_and_resume(
    launch: Callable[..., list[str]], root: Path, last_step: int, env: dict[str, str] = SUBPROCESS_ENV, **flags
) -> tuple[Path, Path, str, str]:
    """Run `launch(*script flags)` into root/whole; then a copy, root/resumed, cut back to the
    checkpoint before step `last_step` (as if killed after it), resumes. `flags` go to
    `script_flags`. Returns both folders and both outputs."""
    whole, resumed = root / "whole", root / "resumed"
    output = run_checked(launch(*script_flags(whole, **flags)), root / "whole.log", env)
    shutil.copytree(whole, resumed)
    for later in (resumed / "checkpoints" / f"step_{last_step}", resumed / "model"):
        shutil.rmtree(later)
    resumed_output = run_checked(launch(*script_flags(resumed, **flags, resume=True)), root / "resumed.log", env)
    return whole, resumed, output, resumed_output


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def logged_losses(output_dir: Path) -> list[tuple[int, float, float]]:
    """(step, training loss, learning rate) of every training entry of the run's metrics.jsonl."""
    return [(r["step"], r["train_loss"], r["lr"]) for r in read_metrics(output_dir) if "train_loss" in r]


def listing(folder: Path) -> dict[str, int]:
    """Every file under `folder` with its size: a snapshot to prove nothing was written."""
    return (
        {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
        if folder.exists()
        else {}
    )


def save_tiny_base(folder: Path, tokenizer, seed: int = 0, context_length: int = 192, drop_rate: float = 0.0) -> Path:
    """A randomly initialised 2-layer MiniGPT saved with `tokenizer`: the 'pretrained' input folder."""
    torch.manual_seed(seed)
    config = MiniGPTConfig.from_preset(
        "tiny",
        vocab_size=len(tokenizer),
        context_length=context_length,
        emb_dim=32,
        n_heads=2,
        n_layers=2,
        drop_rate=drop_rate,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    MiniGPTForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def card_results(model_dir: Path) -> dict[str, float]:
    """The `model-index` results of the card in a saved folder, by metric type (what the Hub shows)."""
    from huggingface_hub import ModelCard

    return {r.metric_type: r.metric_value for r in ModelCard.load(model_dir / "README.md").data.eval_results}


@contextmanager
def _as_python_runs(path: Path, argv: list[str] | None = None) -> Iterator[None]:
    """What `python path argv...` sets up: the script's folder first on sys.path (a benchmark imports
    `common` from beside it) and, with `argv`, sys.argv; both put back afterwards."""
    old_argv = sys.argv
    sys.path.insert(0, str(path.parent))
    if argv is not None:
        sys.argv = [str(path), *argv]
    try:
        yield
    finally:
        sys.argv = old_argv
        sys.path.remove(str(path.parent))


def load_script(name: str, folder: str = "scripts") -> ModuleType:
    """`folder/name.py` of the repository (an entry point, or a benchmark) as a fresh module, loaded as
    `python folder/name.py` would load it. Registered in sys.modules, where dataclasses look their
    module up, under a name no package has (scripts/evaluate.py would otherwise hide `evaluate`)."""
    path = REPO_ROOT / folder / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_{folder}_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    with _as_python_runs(path):
        spec.loader.exec_module(module)
    return module


def run_script(name: str, argv: list[str], folder: str = "scripts") -> int | str | None:
    """Run `folder/name.py` as `python folder/name.py argv...` runs it (as __main__); its exit code."""
    path = REPO_ROOT / folder / f"{name}.py"
    try:
        with _as_python_runs(path, argv):
            runpy.run_path(str(path), run_name="__main__")
    except SystemExit as exit_:
        return exit_.code
    return 0
