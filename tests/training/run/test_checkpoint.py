"""training/run/checkpoint.py: only complete checkpoints (marked last) count."""

from __future__ import annotations

import json

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
