"""What a new user runs first: the job configs in scripts/configs parse with their scripts (no
misspelt or stale field), the quickstart stops on step counts, and the README's "Use it like any
Hugging Face model" snippet runs verbatim, in a fresh process, on the folder the quickstart saves."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest
from helpers.processes import SUBPROCESS_ENV
from helpers.runs import REPO_ROOT, load_script

README = REPO_ROOT / "README.md"
CONFIGS = REPO_ROOT / "scripts" / "configs"
JOBS = {
    "pretrain": ["quickstart_pretrain", "pretrain_verdict", "shakespeare_180s"],
    "sft": ["quickstart_sft", "sft_tasks", "sft_lora"],
    "classify": ["classify_demo"],
    "dpo": ["dpo_tasks", "dpo_book"],
    "grpo": ["grpo_tasks"],
}


def test_every_job_config_is_checked_here():
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(name for names in JOBS.values() for name in names)


@pytest.mark.parametrize("script, name", [(script, name) for script, names in JOBS.items() for name in names])
def test_job_config_parses_with_its_script(script, name):
    groups = load_script(script).parse_args([str(CONFIGS / f"{name}.yaml")])
    loop = groups[-1]
    if name.startswith("quickstart"):  # the same steps, hence the same numbers, on every machine
        assert loop.max_time_seconds is None and loop.seed == 1337


def readme_snippet(section: str) -> str:
    """The first ```python block after the heading `section`."""
    text = README.read_text(encoding="utf-8")
    after = text[text.index(f"## {section}\n") :]
    return re.search(r"```python\n(.*?)```", after, re.DOTALL).group(1)


def test_the_hugging_face_snippet_runs_verbatim_on_the_quickstart_folder(lm_dir, tmp_path):
    snippet = readme_snippet("Use it like any Hugging Face model")
    [folder] = re.findall(r'"(runs/quickstart/[^"]+)"', snippet)
    # The quickstart's final folder is a saved MiniGPT like lm_dir (tiny here), so the snippet is
    # checked against the path the quickstart writes, not a path the test makes up.
    assert folder == "runs/quickstart/sft/model"
    shutil.copytree(lm_dir, tmp_path / folder)
    result = subprocess.run(
        [sys.executable, "-c", snippet], cwd=tmp_path, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    [generated] = re.findall(r"'generated_text': '(.*)'\}\]", result.stdout)
    assert generated.startswith("The for statement") and len(generated) > len("The for statement")
