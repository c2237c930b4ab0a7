"""What a new user runs first: the job configs in scripts/configs parse with their scripts (no
misspelt or stale field), and the quickstart stops on step counts. The README's commands and its
"Use it like any Hugging Face model" snippet: tests/scripts/test_readme.py."""

from __future__ import annotations

import pytest
from helpers.runs import REPO_ROOT, load_script

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
