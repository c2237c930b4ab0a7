"""Instruction fine-tuning (SFT) of a saved MiniGPT (or converted GPT-2) folder.

    python scripts/sft.py scripts/configs/sft_tasks.yaml --model_path runs/pretrain_pydoc/model
    python scripts/sft.py scripts/configs/sft_tasks.yaml --model_path ... --mask_prompt false  # loss on every token
    python scripts/sft.py scripts/configs/sft_lora.yaml --model_path ...                       # LoRA, merged for export
    python scripts/sft.py run.yaml --train_file my_alpaca.json --resume                        # continue a run
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \\
        --mixed_precision no --dynamo_backend no --main_process_port 29521 scripts/sft.py run.yaml

Every flag can also be a key of a YAML/JSON file given first; flags after it override it.
Without --train_file the run uses the embedded instruction tasks (no download). Outputs:
<output_dir>/model (loads with AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)),
<output_dir>/adapter (LoRA only), heldout_generations.json, final_metrics.json, metrics.jsonl,
loss_curve.png and checkpoints for --resume.
"""

from __future__ import annotations

import sys

from accelerate import PartialState

from training.cli import USER_ERRORS, parse_config_args, report_error
from training.jobs.sft import SFTArguments, run_sft
from training.run.arguments import LoopArguments
from training.run.loop import NonFiniteLossError
from training.run.lora import LoraArguments

ARGUMENTS = (SFTArguments, LoraArguments, LoopArguments)


def parse_args(argv: list[str] | None = None) -> tuple[SFTArguments, LoraArguments, LoopArguments]:
    """CLI flags, optionally after a leading YAML/JSON config file whose values become defaults."""
    return parse_config_args(ARGUMENTS, argv, __doc__.split("\n\n")[0])


def main(argv: list[str] | None = None) -> int:
    try:
        result = run_sft(*parse_args(argv))
    except (*USER_ERRORS, NonFiniteLossError) as error:  # bad input, a run folder conflict, a diverged run
        return report_error(error)
    if PartialState().is_main_process:
        exact_match = result.after.get("val_exact_match", float("nan"))
        print(f"done: {result.steps} steps; held-out exact match {exact_match:.3f}; model in {result.model_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
