"""Preference tuning (DPO) of a saved MiniGPT (or converted GPT-2) folder, usually an SFT model.

    python scripts/dpo.py scripts/configs/dpo_tasks.yaml --model_path runs/sft_tasks/model   # embedded tasks
    python scripts/dpo.py scripts/configs/dpo_book.yaml --model_path runs/sft_book/model \\
        --train_file ../shared/data/book/instruction-data-with-preference.json               # the book's pairs
    python scripts/dpo.py run.yaml --finetune lora                 # LoRA: the reference is the adapter disabled
    python scripts/dpo.py run.yaml --reference precomputed         # reference log-probs computed once, cached
    python scripts/dpo.py run.yaml --resume                        # continue a run
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \\
        --mixed_precision no --dynamo_backend no --main_process_port 29531 scripts/dpo.py run.yaml

Every flag can also be a key of a YAML/JSON file given first; flags after it override it.
Without --train_file the run uses the embedded preference tasks (no download). Outputs:
<output_dir>/model (loads with AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)),
<output_dir>/adapter (LoRA only), preference_curves.png, heldout_generations.json (answers before
and after), final_metrics.json, metrics.jsonl, loss_curve.png and checkpoints for --resume.
"""

from __future__ import annotations

import sys

from accelerate import PartialState

from training.cli import USER_ERRORS, parse_config_args, report_error
from training.jobs.dpo import DPOArguments, run_dpo
from training.run.arguments import LoopArguments
from training.run.loop import NonFiniteLossError
from training.run.lora import LoraArguments

ARGUMENTS = (DPOArguments, LoraArguments, LoopArguments)


def parse_args(argv: list[str] | None = None) -> tuple[DPOArguments, LoraArguments, LoopArguments]:
    """CLI flags, optionally after a leading YAML/JSON config file whose values become defaults."""
    return parse_config_args(ARGUMENTS, argv, __doc__.split("\n\n")[0])


def main(argv: list[str] | None = None) -> int:
    try:
        result = run_dpo(*parse_args(argv))
    except (*USER_ERRORS, NonFiniteLossError) as error:  # bad input, a run folder conflict, a diverged run
        return report_error(error)
    if PartialState().is_main_process:
        accuracy = result.after["val_reward_accuracy"]
        print(f"done: {result.steps} steps; held-out reward accuracy {accuracy:.3f}; model in {result.model_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
