"""The README's commands run as written, in the order a reader meets them, so it cannot drift.

`test_every_readme_command_runs_in_order` reads the README's ```bash and ```python blocks in
order and runs each command (a line ending in a backslash continues on the next; comments and
blank lines are dropped) with bash, in a scratch checkout: links to this checkout's files, its own
`runs/`, and `../shared` linked beside it when this checkout has one (the book's data, The
Verdict). It runs in this interpreter's environment, made the active one (VIRTUAL_ENV, PATH), so
scripts/setup.sh uses it as it is and installs nothing; PYTHONPATH puts this checkout's packages
first. What the test changes, so that the whole README takes a few minutes instead of hours:
- `bash scripts/quickstart.sh` runs with QUICKSTART_MAX_STEPS=2 (the script reads it);
- each training script gets the flags of SMALL_RUNS appended (flags after a config
  file override it, as the README says);
- a fixed --main_process_port becomes a free one (other runs may hold the README's port);
- `scripts/push_to_hub.py` pushes to a Hub-compatible server on 127.0.0.1 (HF_ENDPOINT).
Commands it does not run are in SKIPPED, each with the reason. The python blocks run with
`python -c` in the same place, e.g. the "Use it like any Hugging Face model" snippet on the
folders the quickstart just saved.

`test_the_hugging_face_snippet_answers_on_the_quickstart_folders` runs that snippet verbatim on
stand-ins of the quickstart's folders (tiny, untrained), and is not slow.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.hub_server import HubServer
from helpers.processes import SUBPROCESS_ENV, free_port
from helpers.runs import REPO_ROOT

README = REPO_ROOT / "README.md"

# Appended to a command that runs scripts/<name>.py: small runs on the README's own data and configs.
SMALL_RUNS = {
    "pretrain": ["--max_steps", "2", "--eval_every", "2", "--eval_batches", "1", "--sample_tokens", "4"],
    "sft": ["--max_steps", "2", "--num_train_tasks", "32", "--num_heldout_tasks", "4", "--eval_generations", "2"],
    "dpo": ["--max_steps", "2", "--num_train_pairs", "32", "--num_heldout_pairs", "4", "--eval_generations", "2"],
    "classify": ["--max_steps", "2", "--num_demo_examples", "60"],
    "grpo": ["--max_steps", "2", "--num_train_tasks", "32", "--num_heldout_tasks", "4", "--eval_generations", "4"],
}

# (pattern found in the command, why the test does not run it)
SKIPPED = [
    ("python -m venv", "installs: scripts/setup.sh does the same, and the test runs in an installed environment"),
    ("pip install", "installs (as above)"),
    ("source .venv/bin/activate", "the test's environment is the active one already"),
    ("bash scripts/test.sh", "the test suite this test is part of"),
    ("scripts/app.py", "serves until stopped; tests/apps/test_web.py runs the app"),
    ("minigpt-app", "the same app"),
    ("minigpt-serve", "serves until stopped; tests/apps/test_serve.py runs the server and the openai client"),
    ("localhost:8000", "a request to that server (curl, the openai client)"),
    ("llama-cli", "llama.cpp's CLI is not built here; tests/training/saved/test_runtimes.py runs its library"),
    ("ollama", "Ollama is not installed here (as above)"),
    ("--format executorch", "needs the executorch extra, which setup.sh leaves out; test_runtimes.py skips without it"),
    ("--config_file scripts/configs/accelerate/", "GPUs; tests/scripts/test_accelerate_configs.py checks the configs"),
    ("benchmarks/bench_", "measures for minutes; tests/benchmarks/ runs the harnesses small"),
]


def readme_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every ```bash and ```python block, in order."""
    return re.findall(r"^```(bash|python)\n(.*?)^```", text, re.DOTALL | re.MULTILINE)


def bash_commands(body: str) -> list[str]:
    """The commands of a bash block: comments and blank lines dropped, a line ending in a backslash
    or inside an open quote (curl's JSON) joined with the next."""
    commands, pending = [], ""
    for line in body.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        pending += line
        try:
            shlex.split(pending, comments=True)
        except ValueError:  # no closing quotation yet
            pending += "\n"
            continue
        commands.append(pending.strip())
        pending = ""
    assert not pending, f"a README command does not end: {pending}"
    return commands


def readme_steps() -> list[tuple[str, str]]:
    """("bash" | "python", command or snippet) of the whole README, in order."""
    steps = []
    for language, body in readme_blocks(README.read_text(encoding="utf-8")):
        if language == "python":
            steps.append(("python", body))
        else:
            steps.extend(("bash", command) for command in bash_commands(body))
    return steps


def skip_reason(command: str) -> str | None:
    return next((why for pattern, why in SKIPPED if pattern in command), None)


def as_run_here(command: str) -> str:
    """The command with the test's small-run flags and a free port (see the module docstring)."""
    command = re.sub(r"--main_process_port \d+", f"--main_process_port {free_port()}", command)
    script = re.search(r"scripts/(\w+)\.py", command)
    if script and script.group(1) in SMALL_RUNS:
        command += " " + shlex.join(SMALL_RUNS[script.group(1)])
    return command


def scratch_checkout(root: Path) -> Path:
    """`root`/checkout: links to every top-level entry of this checkout but its outputs and venvs."""
    checkout = root / "checkout"
    checkout.mkdir()
    for entry in REPO_ROOT.iterdir():
        if entry.name not in {"runs", ".venv", ".venv-ci", ".git"}:
            (checkout / entry.name).symlink_to(entry)
    shared = REPO_ROOT.parent / "shared"
    if shared.is_dir():
        (root / "shared").symlink_to(shared)
    return checkout


def environment() -> dict[str, str]:
    """This interpreter's environment as the active one, with this checkout's packages first."""
    return {
        **SUBPROCESS_ENV,
        "VIRTUAL_ENV": sys.prefix,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        "QUICKSTART_MAX_STEPS": "2",
        "HF_TOKEN": "hf_readme",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }


def run_step(language: str, command: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    argv = ["bash", "-c", f"set -euo pipefail\n{command}"] if language == "bash" else [sys.executable, "-c", command]
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def assert_answer_and_free_text(output: str) -> None:
    """The snippet printed the fine-tuned model's answer, then free text longer than its prompt."""
    assert "The for statement" in output, output
    answer, continuation = output.split("The for statement", 1)
    assert answer.strip(), output
    assert continuation.strip(), output


def test_readme_commands_are_found():
    """The parsing the slow test relies on: the two quickstart commands come first, in that order."""
    commands = [command for language, command in readme_steps() if language == "bash"]
    assert commands[:2] == ["bash scripts/quickstart.sh", "bash scripts/test.sh"]
    assert any(c.startswith("accelerate launch scripts/pretrain.py") and "--resume" in c for c in commands)
    for command in commands:  # one spelling taught: the dataclasses' snake_case
        assert not re.search(r" --[a-z]+-[a-z-]+", command), command


@pytest.mark.slow
@pytest.mark.skipif(not (REPO_ROOT.parent / "shared" / "data").is_dir(), reason="the README names ../shared/data")
def test_every_readme_command_runs_in_order(tmp_path):
    checkout = scratch_checkout(tmp_path)
    env = environment()
    ran, skipped = [], []
    with HubServer(token="hf_readme") as hub:
        env["HF_ENDPOINT"] = hub.url
        for language, command in readme_steps():
            if why := skip_reason(command):
                skipped.append((command, why))
                continue
            command = as_run_here(command) if language == "bash" else command
            start = time.monotonic()
            result = run_step(language, command, checkout, env)
            output = result.stdout + result.stderr
            assert result.returncode == 0, f"README command failed: {command}\n{output[-4000:]}"
            assert "Traceback" not in output, f"{command}\n{output[-4000:]}"
            ran.append((command, round(time.monotonic() - start, 1), output))
    print("\n".join(f"{seconds:6.1f} s  {command[:150]}" for command, seconds, _ in ran))
    print("skipped:\n" + "\n".join(f"  {command[:100]}: {why}" for command, why in skipped))

    # The snippet ran on the quickstart's folders (what 2-step models say is not checked: the
    # stand-in test below checks its shape, and the quickstart's report what a real run says).
    [snippet_output] = [out for command, _, out in ran if 'folder = "runs/quickstart/sft/model"' in command]
    assert "The for statement" in snippet_output, snippet_output
    # What the fine-tuning commands were given: the README's own-text model, whose context takes the records.
    for name in ("sft_tasks", "sft_lora", "sft_book", "dpo_tasks", "dpo_book", "classify_demo"):
        assert (checkout / "runs" / name / "model" / "config.json").is_file(), name


@pytest.fixture
def quickstart_stand_ins(lm_dir, tmp_path) -> Path:
    """The quickstart's two folders as a reader has them after it, as tiny untrained stand-ins (lm_dir)."""
    for stage in ("sft", "pretrain"):
        shutil.copytree(lm_dir, tmp_path / "runs" / "quickstart" / stage / "model")
    return tmp_path


def test_the_hugging_face_snippet_answers_on_the_quickstart_folders(quickstart_stand_ins):
    section = README.read_text(encoding="utf-8").split("## Use it like any Hugging Face model\n")[1]
    [(_, snippet)] = readme_blocks(section)[:1]
    result = run_step("python", snippet, quickstart_stand_ins, SUBPROCESS_ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_answer_and_free_text(result.stdout)  # untrained stand-ins say nothing sensible, but say something
