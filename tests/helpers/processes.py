"""Scripts in subprocesses: two real CPU processes, and a run killed mid-way (SIGKILL resume tests)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

# One thread per process: bit-exact comparisons need the same reduction order in every run,
# and on a busy 2-core machine two OpenMP threads per process are ~20x slower, not faster.
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def launch(script: Path, flags: list[str], log: Path) -> subprocess.Popen:
    """Start `python script flags...`, its output going to `log`."""
    with open(log, "w") as f:
        return subprocess.Popen(
            [sys.executable, str(script), *flags],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=SUBPROCESS_ENV,
            cwd=log.parent,
        )


def last_logged_step(output_dir: Path) -> int:
    """The step of the last line of the run's metrics.jsonl (0 before the first)."""
    try:
        return json.loads((output_dir / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    except (FileNotFoundError, IndexError, json.JSONDecodeError):
        return 0


def sigkill_after_step(process: subprocess.Popen, output_dir: Path, step: int, log: Path, timeout: float = 600) -> int:
    """SIGKILL `process` once its run has logged `step`; returns the last step it logged."""
    deadline = time.monotonic() + timeout
    while last_logged_step(output_dir) < step and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, "the run finished before it could be killed:\n" + log.read_text()[-2000:]
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (output_dir / "model").exists()
    return last_logged_step(output_dir)


def free_port() -> int:
    """A port nobody listens on, so concurrent multi-process runs do not collide."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def two_cpu_processes(script: Path | str, *flags: str) -> list[str]:
    """The command that runs `script` on two real CPU processes (gloo DDP). Run it with
    ACCELERATE_USE_CPU=1 in the environment: without it --multi_gpu on a CPU machine starts two
    independent processes (and `--cpu --num_processes 2` silently runs one)."""
    launch = "--multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no".split()
    port = ["--main_process_port", str(free_port())]
    return [sys.executable, "-m", "accelerate.commands.launch", *launch, *port, str(script), *flags]
