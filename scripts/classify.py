"""Classification fine-tuning: a saved MiniGPT (or converted GPT-2) folder -> a text classifier.

    python scripts/classify.py scripts/configs/classify_demo.yaml --model_path runs/pretrain_pydoc/model
    python scripts/classify.py scripts/configs/classify_demo.yaml --model_path ... --finetune lora
    python scripts/classify.py run.yaml --train_file reviews.csv --text_column review --label_column stars
    python scripts/classify.py run.yaml --resume                                   # continue a run
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \\
        --mixed_precision no --dynamo_backend no --main_process_port 29531 scripts/classify.py run.yaml

Every flag can also be a key of a YAML/JSON file given first; flags after it override it.
Without --train_file the run uses the embedded topic demo (no download). --finetune picks the
book's recipe (last_block: last block + final norm + head), full or lora. Outputs:
<output_dir>/model (loads with AutoModelForSequenceClassification(..., trust_remote_code=True)
and pipeline("text-classification")), <output_dir>/adapter (LoRA only), final_metrics.json
(accuracy and confusion matrix on validation and test), metrics.jsonl, loss_curve.png and
checkpoints for --resume.
"""

from __future__ import annotations

import sys

from accelerate import PartialState

from training.cli import USER_ERRORS, parse_config_args, report_error
from training.jobs.classify import ClassifyArguments, run_classification
from training.run.arguments import LoopArguments
from training.run.loop import NonFiniteLossError
from training.run.lora import LoraArguments

ARGUMENTS = (ClassifyArguments, LoraArguments, LoopArguments)


def parse_args(argv: list[str] | None = None) -> tuple[ClassifyArguments, LoraArguments, LoopArguments]:
    """CLI flags, optionally after a leading YAML/JSON config file whose values become defaults."""
    return parse_config_args(ARGUMENTS, argv, __doc__.split("\n\n")[0])


def main(argv: list[str] | None = None) -> int:
    try:
        result = run_classification(*parse_args(argv))
    except (*USER_ERRORS, NonFiniteLossError) as error:  # bad input, a run folder conflict, a diverged run
        return report_error(error)
    if PartialState().is_main_process:
        test = f", test {result.test.accuracy:.3f}" if result.test else ""
        accuracy = f"accuracy validation {result.validation.accuracy:.3f}{test}"
        print(f"done: {result.steps} steps; {accuracy}; model in {result.model_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
