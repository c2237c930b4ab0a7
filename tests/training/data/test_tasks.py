"""training/data/tasks.py: the embedded instruction tasks: determinism, correct answers, disjoint splits."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections import Counter

import pytest
from helpers.runs import REPO_ROOT

from training.data.tasks import (
    FIELD_KEYS,
    TASK_KINDS,
    WORDS,
    draw_distinct,
    generate_tasks,
    make_task_splits,
    split_tasks,
)


def digest(records) -> str:
    return hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()


def test_same_seed_same_tasks_in_a_fresh_process_with_another_hash_seed():
    """No hash() or set order leaks in: a new interpreter with a different PYTHONHASHSEED agrees."""
    code = (
        "import hashlib, json; from training.data.tasks import generate_tasks; "
        "print(hashlib.sha256(json.dumps(generate_tasks(200, seed=7), sort_keys=True).encode()).hexdigest())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == digest(generate_tasks(200, seed=7))
    assert digest(generate_tasks(200, seed=8)) != digest(generate_tasks(200, seed=7))


def test_first_records_are_pinned():
    """Changing a generator changes every split and metric reported so far: do it on purpose."""
    assert generate_tasks(4, seed=0) == [
        {
            "instruction": "Say the following words again: ring bread jam",
            "input": "",
            "output": "ring bread jam",
            "kind": "repeat",
        },
        {
            "instruction": "Reverse the order of the words.",
            "input": "leaf seed oak tree",
            "output": "tree oak seed leaf",
            "kind": "reverse",
        },
        {
            "instruction": "Put the numbers in increasing order.",
            "input": "17, 36, 96, 12, 79",
            "output": "12, 17, 36, 79, 96",
            "kind": "sort",
        },
        {"instruction": "What is 34 plus 45?", "input": "", "output": "79", "kind": "add"},
    ]


def check_answer(record: dict) -> None:
    """Recompute each kind's answer from its instruction and input, independently of the generator."""
    kind, instruction, text, output = record["kind"], record["instruction"], record["input"], record["output"]
    if kind == "repeat":
        assert instruction.endswith(": " + output) and text == ""
    elif kind == "reverse":
        assert output.split() == text.split()[::-1]
    elif kind == "sort":
        numbers = [int(x) for x in text.split(", ")]
        assert output == ", ".join(str(x) for x in sorted(numbers))
    elif kind == "add":
        a, b = map(int, re.findall(r"\d+", instruction))
        assert output == str(a + b) and text == ""
    elif kind == "longest":
        words = text.split()
        longest = [w for w in words if len(w) == max(map(len, words))]
        assert longest == [output]
    elif kind == "extract":
        key = next(k for k in FIELD_KEYS if f" {k} " in instruction or instruction.endswith(f" {k}."))
        fields = dict(line.split(": ") for line in text.split("\n"))
        assert output == fields[key]
    else:
        raise AssertionError(f"unchecked kind {kind}")


def test_every_answer_is_correct_and_short(tiny_tokenizer):
    records = generate_tasks(600, seed=1)
    for record in records:
        check_answer(record)
        if record["kind"] in ("repeat", "reverse", "longest"):
            assert set(record["output"].split()) <= set(WORDS)
    n_tokens = [len(tiny_tokenizer(r["output"], add_special_tokens=False)["input_ids"]) for r in records]
    assert max(n_tokens) <= 40, max(n_tokens)
    assert set(Counter(r["kind"] for r in records).values()) == {100}  # round-robin: balanced


def test_kinds_can_be_chosen_and_unknown_kinds_are_refused():
    records = generate_tasks(9, seed=0, kinds=["add", "sort"])
    assert [r["kind"] for r in records] == ["add", "sort"] * 4 + ["add"]
    with pytest.raises(ValueError, match=r"unknown task kinds \['multiply'\]; known kinds: repeat, reverse"):
        generate_tasks(3, seed=0, kinds=["add", "multiply"])
    assert set(TASK_KINDS) == {"repeat", "reverse", "sort", "add", "longest", "extract"}


def test_no_duplicate_prompts_within_a_set():
    records = generate_tasks(3000, seed=2)
    assert len({(r["instruction"], r["input"]) for r in records}) == 3000


def test_splits_are_disjoint_balanced_and_deterministic():
    train, heldout = make_task_splits(1200, 120, seed=5)
    assert (len(train), len(heldout)) == (1200, 120)
    prompts = lambda rs: {(r["instruction"], r["input"]) for r in rs}  # noqa: E731
    assert not prompts(train) & prompts(heldout)
    assert set(Counter(r["kind"] for r in heldout).values()) == {20}
    assert make_task_splits(1200, 120, seed=5) == (train, heldout)


def test_split_refuses_a_shared_prompt():
    a = {"instruction": "Add 1 and 2.", "input": "", "output": "3"}
    b = {"instruction": "Add 2 and 2.", "input": "", "output": "4"}
    with pytest.raises(ValueError, match=r"1 \(instruction, input\) pairs are in both splits"):
        split_tasks([a, b, dict(a)], n_heldout=1)
    assert split_tasks([a, b], n_heldout=1) == ([b], [a])


def test_draw_distinct_raises_instead_of_looping_forever():
    with pytest.raises(ValueError, match="could only draw 3 distinct items of the 5 asked for"):
        draw_distinct(5, lambda i: i % 3, key=lambda x: x)
    with pytest.raises(ValueError, match="could only draw 5000 distinct"):
        generate_tasks(5001, seed=0, kinds=["add"])  # 50 * 50 pairs x 2 phrasings
