"""training/cli.py: a YAML/JSON file then flags, into typed dataclasses."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from training.cli import parse_config_args
from training.jobs.sft import SFTArguments
from training.run.arguments import LoopArguments
from training.run.lora import LoraArguments


def test_config_file_then_flags(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("model_path: base\nmax_steps: 7\nlora_r: 2\nmask_prompt: false\n")
    sft, lora, loop = parse_config_args(
        (SFTArguments, LoraArguments, LoopArguments), [str(config), "--max_steps", "9", "--output_dir", "o"]
    )
    assert (sft.model_path, sft.mask_prompt, lora.lora_r, loop.max_steps, loop.output_dir) == ("base", False, 2, 9, "o")
    config.write_text("max_step: 7\n")
    with pytest.raises(ValueError, match=r"unknown keys \['max_step'\]"):
        parse_config_args((SFTArguments, LoraArguments, LoopArguments), [str(config)])


def test_errors_are_one_line_with_exit_code_1_and_foreign_classes_named(capsys):
    from tokenization.corpus import DataFileNotFoundError
    from training.cli import report_error

    class RepositoryNotFoundError(OSError):  # another library's error, like the Hub client's
        pass

    assert report_error(DataFileNotFoundError("--train_file x.txt does not exist")) == 1
    assert capsys.readouterr().err == "error: --train_file x.txt does not exist\n"
    assert report_error(ValueError("--max_steps must be >= 1, got 0")) == 1
    assert capsys.readouterr().err == "error: --max_steps must be >= 1, got 0\n"
    assert report_error(RepositoryNotFoundError("404 Client Error.")) == 1
    assert capsys.readouterr().err == "error: RepositoryNotFoundError: 404 Client Error.\n"


@pytest.mark.parametrize(
    ("error", "line"),
    [
        (
            "WriteError(errno.ENOSPC, 'runs/x/model.safetensors')",
            "error: no space left on device writing runs/x/model.safetensors (free some space or choose a folder on "
            "another disk)",
        ),
        (
            "WriteError(errno.EROFS, 'runs/x')",
            "error: read-only file system writing runs/x (choose a folder on a writable file system)",
        ),
        (
            "PermissionError(errno.EACCES, 'Permission denied', 'runs/x')",
            "error: permission denied: runs/x (check the permissions, or choose another folder)",
        ),
        (
            "NotADirectoryError(errno.ENOTDIR, 'Not a directory', 'runs/x/y')",
            "error: not a directory: runs/x/y (a part of the path is a file, not a folder)",
        ),
    ],
)
def test_errors_of_the_file_system_are_one_line_with_what_to_do(error, line, capsys):
    import errno  # noqa: F401 (used by the expressions)

    from modeling_minigpt.files import WriteError  # noqa: F401
    from training.cli import report_error

    assert report_error(eval(error)) == 1
    assert capsys.readouterr().err.strip() == line


@dataclass
class _Push:
    folder: str
    private: bool = False


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--folder", "x", "--bogus", "1"], "unknown arguments --bogus 1; run with --help"),
        (["--folder", "x", "[--private]"], r"unknown arguments \[--private\]"),  # a usage line taken literally
        (["--private"], "the following arguments are required: --folder"),
        (["--folder", "x", "--private", "maybe"], "argument --private: Truthy value expected"),
    ],
)
def test_a_flag_argparse_refuses_is_a_value_error_not_its_usage_block_and_exit_2(argv, message):
    """So every script reports it like any bad input: one `error: ...` line and exit code 1."""
    with pytest.raises(ValueError, match=message):
        parse_config_args((_Push,), argv)
