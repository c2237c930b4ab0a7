"""Scripts in subprocesses: two real CPU processes, and a run SIGKILLed from inside at a chosen call."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

# One thread per process: bit-exact comparisons need the same reduction order in every run,
# and on a busy 2-core machine two OpenMP threads per process are ~20x slower, not faster.
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def run_checked(command: list[str], log: Path | None = None, env: dict[str, str] = SUBPROCESS_ENV) -> str:
    """Run `command` to its end and return its output (also written to `log` if given); fails,
    showing the output's tail, unless it exits 0."""
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    output = result.stdout + result.stderr
    if log is not None:
        log.write_text(output)
    assert result.returncode == 0, output[-4000:]
    return output


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


# Runs a script as `python script flags...` would, with `module.function` replaced by a wrapper that
# SIGKILLs the process when `condition` (a Python expression over the call's `args` and `kwargs`)
# holds, and calls through otherwise. The kill comes at a chosen call, not after a poller noticed
# something: the same point on a fast machine and a slow one.
DRIVER = textwrap.dedent(
    """
    import importlib, os, runpy, signal, sys
    module_name, function_name, condition, script, *flags = sys.argv[1:]
    module = importlib.import_module(module_name)
    original = getattr(module, function_name)

    def wrapper(*args, **kwargs):
        if eval(condition, {"args": args, "kwargs": kwargs, "os": os}):
            print("driver: SIGKILL in", function_name, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(module, function_name, wrapper)
    sys.argv = [script, *flags]
    runpy.run_path(script, run_name="__main__")
    """
)


def killed_in(script: Path, target: str, condition: str, flags: list[str], cwd: Path) -> str:
    """Run `script` with `target` ("module:function", looked up there at each call) SIGKILLing its
    process when `condition` holds; its output. Fails unless the process was killed so."""
    module, function = target.split(":")
    command = [sys.executable, "-c", DRIVER, module, function, condition, str(script), *flags]
    result = subprocess.run(command, capture_output=True, text=True, env=SUBPROCESS_ENV, cwd=cwd, timeout=600)
    assert result.returncode == -9, f"not killed ({result.returncode}):\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
    assert "driver: SIGKILL in" in result.stdout
    return result.stdout


def killed_before_logging(script: Path, flags: list[str], step: int, cwd: Path) -> str:
    """Run `script` and SIGKILL it as its training loop is about to log `step`: the step before it
    is logged (and evaluated, when due), this one computed but neither logged nor checkpointed."""
    # train_loop calls log_metrics(accelerator, metrics, step, values) through the module's globals.
    return killed_in(script, "training.run.loop:log_metrics", f"args[2] == {step}", flags, cwd)


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
