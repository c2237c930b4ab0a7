"""Instruction fine-tuning (SFT) of a saved MiniGPT (or converted GPT-2) folder.

    python scripts/sft.py scripts/configs/sft_tasks.yaml --model_path runs/pretrain_pydoc/model
    python scripts/sft.py scripts/configs/sft_tasks.yaml --model_path ... --mask_prompt false   # loss on every token
    python scripts/sft.py scripts/configs/sft_lora.yaml --model_path ...                        # LoRA, merged for export
    python scripts/sft.py run.yaml --train_file my_alpaca.json --resume                         # continue a run
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
from pathlib import Path

from accelerate import PartialState

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(REPO_ROOT))

from training.lora import LoraArguments  # noqa: E402
from training.loop import LoopArguments, NonFiniteLossError  # noqa: E402
from training.cli import parse_config_args  # noqa: E402
from training.sft import SFTArguments, run_sft  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    try:
        sft_args, lora_args, loop_args = parse_config_args((SFTArguments, LoraArguments, LoopArguments), argv, __doc__.split("\n\n")[0])
        result = run_sft(sft_args, lora_args, loop_args)
    except (ValueError, FileNotFoundError, NonFiniteLossError) as error:  # bad input, a run folder conflict, a diverged run
        print(f"error: {error}", file=sys.stderr)
        return 1
    if PartialState().is_main_process:
        print(f"done: {result.steps} steps; held-out exact match {result.after.get('val_exact_match', float('nan')):.3f}; model in {result.model_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
