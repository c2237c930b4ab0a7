"""training/saved/outputs.py: the one rule for where a script may write (every script's rows are in
tests/scripts/test_bad_inputs.py; these are the rule's own cases)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from training.saved.outputs import check_outputs, named_inputs


@dataclass
class Arguments:
    model_path: str | None = None
    files: list[str] = field(default_factory=list)
    output_dir: str | None = None  # not an input


def test_named_inputs_are_the_input_fields_that_are_set():
    args = Arguments(model_path="m", files=["a.txt", "b.txt"], output_dir="o")
    assert named_inputs(args, "not a dataclass") == {
        "--model_path": "m",
        "--files [0]": "a.txt",
        "--files [1]": "b.txt",
    }
    assert named_inputs(Arguments(files=["a.txt"])) == {"--files": "a.txt"}


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_output_is_never_an_input_nor_in_or_around_one(tmp_path, overwrite):
    model = tmp_path / "run" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    inputs = {"--model": model}
    for output, relation in [
        (model, "is"),
        (model / "config.json", "lies inside"),
        (tmp_path / "run", "contains"),
        (tmp_path, "contains"),
    ]:
        with pytest.raises(ValueError, match=f"--out {output} {relation} --model {model}: .*not even with --overwrite"):
            check_outputs({"--out": output}, inputs, overwrite)
    check_outputs({"--out": tmp_path / "run" / "other"}, inputs, overwrite)  # a sibling is fine


def test_a_link_does_not_lead_around_the_rule(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (tmp_path / "alias").symlink_to(model)
    with pytest.raises(ValueError, match="lies inside --model"):
        check_outputs({"--output_json": tmp_path / "alias" / "report.json"}, {"--model": model}, overwrite=True)


def test_what_exists_is_replaced_only_with_overwrite(tmp_path):
    (tmp_path / "report.json").write_text("{}")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    (tmp_path / "empty").mkdir()
    for name, what in [("report.json", "exists"), ("full", "is not empty")]:
        with pytest.raises(ValueError, match=f"{name} {what}: pass --overwrite"):
            check_outputs({"--out": tmp_path / name}, {}, overwrite=False)
        check_outputs({"--out": tmp_path / name}, {}, overwrite=True)
    check_outputs({"--out": tmp_path / "empty", "--other": tmp_path / "new" / "x.json", "--none": None}, {}, False)


def test_inputs_that_are_not_paths_are_skipped(tmp_path):
    """A dataset name or the embedded corpus is no folder on disk, so it cannot hold an output."""
    check_outputs({"--out": tmp_path / "run"}, {"--dataset": "wikitext", "--train_file": None}, overwrite=False)
