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
from pathlib import Path

from accelerate import PartialState

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(REPO_ROOT))

from training.classify import ClassifyArguments, run_classification  # noqa: E402
from training.lora import LoraArguments  # noqa: E402
from training.loop import LoopArguments, NonFiniteLossError  # noqa: E402
from training.cli import parse_config_args  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    try:
        cls_args, lora_args, loop_args = parse_config_args((ClassifyArguments, LoraArguments, LoopArguments), argv, __doc__.split("\n\n")[0])
        result = run_classification(cls_args, lora_args, loop_args)
    except (ValueError, FileNotFoundError, NonFiniteLossError) as error:  # bad input, a run folder conflict, a diverged run
        print(f"error: {error}", file=sys.stderr)
        return 1
    test = f", test {result.test.accuracy:.3f}" if result.test else ""
    if PartialState().is_main_process:
        print(f"done: {result.steps} steps; accuracy validation {result.validation.accuracy:.3f}{test}; model in {result.model_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
