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
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(REPO_ROOT))

from training.cli import parse_config_args  # noqa: E402
from training.loop import LoopArguments, NonFiniteLossError  # noqa: E402
from training.pretrain import DataArguments, ModelArguments, run_pretraining  # noqa: E402

ARGUMENT_CLASSES = (ModelArguments, DataArguments, LoopArguments)


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, LoopArguments]:
    """CLI flags, optionally after a leading YAML/JSON config file whose values become defaults."""
    return parse_config_args(ARGUMENT_CLASSES, argv, __doc__.split("\n\n")[0])


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
