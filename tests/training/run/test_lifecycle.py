"""training/run/lifecycle.py: what a run's fingerprint holds.

The whole lifecycle (open -> prepare -> evaluate before -> train -> finish) runs in the job
tests (tests/training/jobs/); the folder rules it applies are in test_folder.py.
"""

from __future__ import annotations

from training.run.arguments import LoopArguments
from training.run.lifecycle import run_fingerprint


def test_the_fingerprint_binds_the_optimisation_but_not_the_cadence():
    fast = LoopArguments(output_dir="a", learning_rate=1e-3, log_every=1, eval_every=5, save_every=5)
    slow_logs = LoopArguments(
        output_dir="b", learning_rate=1e-3, log_every=50, eval_every=100, save_every=100, resume=True
    )
    assert run_fingerprint(fast, model=1) == run_fingerprint(slow_logs, model=1)
    assert run_fingerprint(fast, model=1) != run_fingerprint(LoopArguments(output_dir="a", learning_rate=2e-3), model=1)
