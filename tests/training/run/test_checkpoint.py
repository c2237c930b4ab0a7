"""training/run/checkpoint.py: only complete checkpoints (marked last) count."""

from __future__ import annotations

import json

import pytest

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


@pytest.mark.parametrize(
    ("distributed_type", "fsdp2", "refusal"),
    [
        ("MULTI_GPU", False, None),
        ("FSDP", True, None),  # Accelerate's FSDP2: fully_shard, gathered by parameter name like --fsdp
        ("FSDP", False, "FSDP1 runs are not supported: set fsdp_version: 2"),
        ("DEEPSPEED", False, r"DeepSpeed runs \(optimizer state sharded over the ranks\) are not supported yet"),
    ],
)
def test_only_setups_the_format_can_hold_are_accepted(distributed_type, fsdp2, refusal):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from training.run.checkpoint import check_supported

    accelerator = SimpleNamespace(distributed_type=DistributedType[distributed_type], is_fsdp2=fsdp2)
    if refusal is None:
        check_supported(accelerator)
    else:
        with pytest.raises(ValueError, match=refusal):
            check_supported(accelerator)
