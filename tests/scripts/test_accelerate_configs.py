"""scripts/configs/accelerate/*.yaml, read the way `accelerate launch --config_file` reads them.

No GPU here, so the check stops where a launch would start processes: Accelerate's own launch
parser and config merge (`_validate_launch_command`, what `accelerate launch` runs first), the
environment it hands to each process (`prepare_multi_gpu_env` / `prepare_deepspeed_cmd_env`),
and the FSDP / DeepSpeed plugin each process would build from that environment. For FSDP2 the
resulting wrap policy is then applied to a real MiniGPT.
"""

from __future__ import annotations

import os
from unittest import mock

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
from helpers.accelerate_configs import CONFIGS, NAMES, launch_args, process_env
from torch.distributed.fsdp import StateDictType

from modeling_minigpt import MiniGPTConfig, MiniGPTForCausalLM


def test_the_folder_holds_exactly_the_documented_configs():
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_each_config_is_a_local_8_gpu_bf16_launch_with_its_knobs_explained(name):
    config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
    assert (config.num_processes, config.num_machines, config.mixed_precision, config.use_cpu) == (8, 1, "bf16", False)
    lines = (CONFIGS / f"{name}.yaml").read_text().splitlines()
    for key in ("num_processes", "num_machines", "mixed_precision"):
        line = next(i for i, text in enumerate(lines) if text.startswith(f"{key}:"))
        assert lines[line - 1].startswith("#"), f"{name}.yaml: {key} has no comment saying when to change it"


def test_ddp_runs_plain_multi_gpu():
    args, config = launch_args("ddp")
    assert config.distributed_type == DistributedType.MULTI_GPU
    assert args.multi_gpu and not args.use_fsdp and not args.use_deepspeed
    env = process_env("ddp")
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16" and "ACCELERATE_USE_FSDP" not in env


def test_fsdp2_shards_each_transformer_block_and_saves_sharded_checkpoints():
    args, config = launch_args("fsdp2")
    assert config.distributed_type == DistributedType.FSDP and args.use_fsdp
    env = process_env("fsdp2")
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    with mock.patch.dict(os.environ, env):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.transformer_cls_names_to_wrap == ["TransformerBlock"]
    assert plugin.state_dict_type == StateDictType.SHARDED_STATE_DICT
    assert plugin.reshard_after_forward is True and not plugin.activation_checkpointing
    # The policy Accelerate's prepare() would apply, on a real model: exactly its blocks.
    model = MiniGPTForCausalLM(MiniGPTConfig(vocab_size=64, context_length=8, emb_dim=32, n_heads=2, n_layers=3))
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    assert [name for name, module in model.named_modules() if policy(module)] == [
        f"model.trf_blocks.{i}" for i in range(3)
    ]
    # The same class the model names for device maps and for training.run.distributed.shard_model.
    assert plugin.transformer_cls_names_to_wrap == list(model._no_split_modules)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_configs_set_their_zero_stage(stage):
    name = f"deepspeed_zero{stage}"
    args, config = launch_args(name)
    assert config.distributed_type == DistributedType.DEEPSPEED and args.use_deepspeed
    env = process_env(name)
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true" and env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == str(stage)
    with mock.patch.dict(os.environ, env):
        plugin = DeepSpeedPlugin()  # builds DeepSpeed's JSON config; deepspeed itself is not needed for that
    zero = plugin.deepspeed_config["zero_optimization"]
    assert zero["stage"] == stage
    assert zero["offload_optimizer"]["device"] == "none" and zero["offload_param"]["device"] == "none"
    # ZeRO-3 holds no whole copy of the weights anywhere: without this, save_model writes only shards.
    assert zero["stage3_gather_16bit_weights_on_model_save"] is (stage == 3)
    assert plugin.deepspeed_config["gradient_clipping"] == 1.0


def test_command_line_flags_turn_a_config_into_a_multi_node_launch():
    args, _ = launch_args(
        "fsdp2", "--num_processes", "16", "--num_machines", "2", "--machine_rank", "1", "--main_process_ip", "10.0.0.1"
    )
    assert (args.num_processes, args.num_machines, args.machine_rank, args.main_process_ip) == (16, 2, 1, "10.0.0.1")
    assert args.use_fsdp and args.main_process_port == 29500  # the rest still comes from the file
