"""Pretrain a MiniGPT on a text corpus.

    python scripts/pretrain.py scripts/configs/pretrain_verdict.yaml
    python scripts/pretrain.py scripts/configs/pretrain_verdict.yaml --max_steps 50 --output_dir runs/try
    python scripts/pretrain.py scripts/configs/pretrain_verdict.yaml --resume   # from the latest checkpoint
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \\
        --mixed_precision no --dynamo_backend no --main_process_port 29511 scripts/pretrain.py run.yaml

Every flag can also be a key of a YAML/JSON file given first; flags after it override it.
Outputs (checkpoints, metrics.jsonl, loss_curve.png, TensorBoard logs, the final model in
<output_dir>/model) are listed when the run starts.
"""

from __future__ import annotations

import sys
from dataclasses import fields
from pathlib import Path

import yaml
from transformers import HfArgumentParser

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(REPO_ROOT))

from training.loop import LoopArguments, NonFiniteLossError  # noqa: E402
from training.pretrain import DataArguments, ModelArguments, run_pretraining  # noqa: E402

ARGUMENT_CLASSES = (ModelArguments, DataArguments, LoopArguments)


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, LoopArguments]:
    """CLI flags, optionally after a leading YAML/JSON config file whose values become defaults.

    Same convention as scripts/evaluate.py: `pretrain.py run.yaml --max_steps 10`.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = HfArgumentParser(ARGUMENT_CLASSES, description=__doc__.split("\n\n")[0])
    if argv and Path(argv[0]).suffix in {".yaml", ".yml", ".json"}:
        parser.set_defaults(**_read_config(Path(argv[0])))
        argv = argv[1:]
    return tuple(parser.parse_args_into_dataclasses(args=argv))


def _read_config(path: Path) -> dict:
    if not path.is_file():
        raise ValueError(f"config file {path} not found")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of flag names to values, got {type(values).__name__}")
    known = {f.name for cls in ARGUMENT_CLASSES for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; run with --help for the accepted flags")
    return values


def main(argv: list[str] | None = None) -> int:
    try:
        model_args, data_args, loop_args = parse_args(argv)
        run_pretraining(model_args, data_args, loop_args)  # prints the config, progress and results
    except (ValueError, NonFiniteLossError) as error:  # bad input, a run folder conflict, a diverged run
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
