"""GRPO from verifiable rewards on a saved MiniGPT (or converted GPT-2) folder, usually an SFT model.

    python scripts/grpo.py scripts/configs/grpo_tasks.yaml --model_path runs/quickstart/sft/model   # embedded tasks
    python scripts/grpo.py run.yaml --reward_functions exact_match format --reward_weights 1 0.1
    python scripts/grpo.py run.yaml --reward_functions my_rewards:score --train_file my_tasks.jsonl   # your own
    python scripts/grpo.py run.yaml --finetune lora --beta 0.04    # LoRA: the reference is the adapter disabled
    python scripts/grpo.py run.yaml --resume                       # continue a run
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \\
        --mixed_precision no --dynamo_backend no --main_process_port 29532 scripts/grpo.py run.yaml

Every flag can also be a key of a YAML/JSON file given first; flags after it override it.
Without --train_file the run uses the embedded tasks (no download); --data_seed 0 and the SFT
run's kinds give the SFT run's held-out prompts. A reward function of your own takes TRL's
signature, f(completions, **kwargs) -> list of floats (see training/data/rewards.py). Outputs:
<output_dir>/model (loads with AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)),
<output_dir>/adapter (LoRA only), grpo_curves.png, heldout_generations.json (greedy answers before
and after), final_metrics.json, metrics.jsonl, loss_curve.png and checkpoints for --resume.
"""

from __future__ import annotations

import sys

from accelerate import PartialState

from training.cli import USER_ERRORS, parse_config_args, report_error
from training.jobs.grpo import GRPOArguments, run_grpo
from training.run.arguments import LoopArguments
from training.run.loop import NonFiniteLossError
from training.run.lora import LoraArguments

ARGUMENTS = (GRPOArguments, LoraArguments, LoopArguments)


def parse_args(argv: list[str] | None = None) -> tuple[GRPOArguments, LoraArguments, LoopArguments]:
    """CLI flags, optionally after a leading YAML/JSON config file whose values become defaults."""
    return parse_config_args(ARGUMENTS, argv, __doc__.split("\n\n")[0])


def main(argv: list[str] | None = None) -> int:
    try:
        result = run_grpo(*parse_args(argv))
    except (*USER_ERRORS, NonFiniteLossError) as error:  # bad input, a run folder conflict, a diverged run
        return report_error(error)
    if PartialState().is_main_process:
        was = f"{result.before['val_exact_match']:.3f} -> " if result.before else ""
        print(
            f"done: {result.steps} steps; held-out exact match {was}{result.after['val_exact_match']:.3f}; "
            f"model in {result.model_dir}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
