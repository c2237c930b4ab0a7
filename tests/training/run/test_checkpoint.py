"""training/run/checkpoint.py: only complete checkpoints (marked last) count."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from accelerate.utils import DistributedType

from training.run.checkpoint import (
    CHECKPOINT_MARKER,
    checkpoint_dir,
    latest_checkpoint,
    list_checkpoints,
)


def test_incomplete_checkpoints_are_ignored(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (5, 10):
        checkpoint_dir(root, step).mkdir(parents=True)
        (checkpoint_dir(root, step) / CHECKPOINT_MARKER).write_text(json.dumps({"step": step, "num_processes": 1}))
    (root / ".tmp-step_15").mkdir()  # killed while accelerate was writing
    (root / "step_20").mkdir()  # a folder without the marker written last
    (root / "step_20" / "model.safetensors").write_text("")
    assert [s for s, _ in list_checkpoints(root)] == [5, 10]
    assert latest_checkpoint(root) == checkpoint_dir(root, 10)
    assert latest_checkpoint(tmp_path / "none") is None


_ADAMW = SimpleNamespace(optimizer="adamw")


def _deepspeed(stage: int, offload: str = "none", optimizer: str = "adamw"):
    """What `check_supported` reads of an Accelerator under a DeepSpeed config, and the loop's arguments."""
    zero = {"stage": stage, "offload_optimizer": {"device": offload}, "offload_param": {"device": "none"}}
    plugin = SimpleNamespace(zero_stage=stage, deepspeed_config={"zero_optimization": zero})
    accelerator = SimpleNamespace(
        distributed_type=DistributedType.DEEPSPEED, is_fsdp2=False, state=SimpleNamespace(deepspeed_plugin=plugin)
    )
    return accelerator, SimpleNamespace(optimizer=optimizer)


@pytest.mark.parametrize(
    ("setup", "refusal"),
    [
        ((SimpleNamespace(distributed_type=DistributedType.MULTI_GPU, is_fsdp2=False), _ADAMW), None),
        # Accelerate's FSDP2: fully_shard, gathered by parameter name like --fsdp
        ((SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=True), _ADAMW), None),
        (
            (SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=False), _ADAMW),
            "FSDP1 runs are not supported: set fsdp_version: 2",
        ),
        # ZeRO-2/3: gathered by parameter name (training.run.zero, tests/training/run/test_deepspeed.py)
        (_deepspeed(2), None),
        (_deepspeed(3), None),
        (_deepspeed(1), "DeepSpeed ZeRO stage 1 is not supported by the checkpoints: use deepspeed_zero2.yaml"),
        (_deepspeed(2, offload="cpu"), "offload of the optimizer to CPU/NVMe is not supported"),
        (_deepspeed(3, optimizer="muon"), "--optimizer muon does not run under DeepSpeed"),
    ],
)
def test_only_setups_the_format_can_hold_are_accepted(setup, refusal):
    from training.run.checkpoint import check_supported

    if refusal is None:
        check_supported(*setup)
    else:
        with pytest.raises(ValueError, match=refusal):
            check_supported(*setup)
