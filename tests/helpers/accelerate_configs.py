"""How `accelerate launch --config_file scripts/configs/accelerate/<name>.yaml` reads a launch config."""

from __future__ import annotations

from pathlib import Path

from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

CONFIGS = Path(__file__).resolve().parents[2] / "scripts" / "configs" / "accelerate"
NAMES = ["ddp", "fsdp2", "deepspeed_zero2", "deepspeed_zero3"]


def launch_args(name: str, *flags: str):
    """The launcher's arguments after it merged the config file (flags on the command line win)."""
    args = launch_command_parser().parse_args(
        ["--config_file", str(CONFIGS / f"{name}.yaml"), *flags, "scripts/pretrain.py"]
    )
    args, defaults, _ = _validate_launch_command(args)
    return args, defaults


def process_env(name: str, *flags: str) -> dict[str, str]:
    """The environment `accelerate launch` would give each training process."""
    args, defaults = launch_args(name, *flags)
    if args.use_deepspeed:
        # launch_command sets this just before calling the DeepSpeed launcher.
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        return prepare_deepspeed_cmd_env(args)[1]
    return prepare_multi_gpu_env(args)
