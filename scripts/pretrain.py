"""Pretrain a MiniGPT on a text corpus.

    python scripts/pretrain.py scripts/configs/pretrain_verdict.yaml
    python scripts/pretrain.py scripts/configs/pretrain_verdict.yaml --max_steps 50 --output_dir runs/try
    python scripts/pretrain.py scripts/configs/pretrain_verdict.yaml --resume   # from the latest checkpoint
    accelerate launch -m scripts.pretrain scripts/configs/pretrain_verdict.yaml  # as a module, from the checkout
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \\
        --mixed_precision no --dynamo_backend no --main_process_port 29511 scripts/pretrain.py run.yaml

Every flag can also be a key of a YAML/JSON file given first; flags after it override it.
Outputs (checkpoints, metrics.jsonl, loss_curve.png, TensorBoard logs, the final model in
<output_dir>/model) are listed when the run starts.
"""

from __future__ import annotations

import sys

from training.cli import USER_ERRORS, parse_config_args, report_error
from training.jobs.pretrain import DataArguments, ModelArguments, run_pretraining
from training.run.arguments import LoopArguments
from training.run.loop import NonFiniteLossError

ARGUMENTS = (ModelArguments, DataArguments, LoopArguments)


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, LoopArguments]:
    """CLI flags, optionally after a leading YAML/JSON config file whose values become defaults."""
    return parse_config_args(ARGUMENTS, argv, __doc__.split("\n\n")[0])


def main(argv: list[str] | None = None) -> int:
    try:
        run_pretraining(*parse_args(argv))  # prints the config, progress and results
    except (*USER_ERRORS, NonFiniteLossError) as error:  # bad input, a run folder conflict, a diverged run
        return report_error(error)
    return 0


if __name__ == "__main__":
    sys.exit(main())
