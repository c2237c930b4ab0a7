"""Evaluate a saved causal LM on a text file or a dataset: loss, perplexity, bits per byte/char.

    python scripts/evaluate.py --model runs/pretrain_verdict/model --text_file ../shared/data/the-verdict.txt
    python scripts/evaluate.py --model runs/pretrain_verdict/model --dataset data/val.jsonl --text_column text
    python scripts/evaluate.py eval.yaml --stride 256        # a YAML/JSON config, then CLI overrides
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 scripts/evaluate.py ...

Any folder written by `save_pretrained` works (MiniGPT or any other Hugging Face causal LM);
the tokenizer defaults to the same folder. The job is `training.jobs.evaluate`; see
`training/evaluation/metrics.py` for how every number is defined.
"""

from __future__ import annotations

import sys

from training.cli import USER_ERRORS, parse_config_args, report_error
from training.jobs.evaluate import EvaluateArguments, evaluate_folder


def parse_args(argv: list[str] | None = None) -> EvaluateArguments:
    """CLI flags, optionally after a leading YAML/JSON config file whose values become defaults."""
    (args,) = parse_config_args((EvaluateArguments,), argv, __doc__.split("\n\n")[0])
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        evaluate_folder(parse_args(argv))
    except USER_ERRORS as error:
        return report_error(error)
    return 0


if __name__ == "__main__":
    sys.exit(main())
