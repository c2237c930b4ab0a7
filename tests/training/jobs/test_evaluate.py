"""training/jobs/evaluate.py and scripts/evaluate.py: a saved folder scored on a text source, with the
library's numbers, one error line for bad input, and two processes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest
from helpers.models import tiny_model
from helpers.processes import two_cpu_processes
from helpers.runs import load_script, run_script

from modeling_minigpt import MiniGPTForCausalLM
from training.evaluation.metrics import (
    evaluate_texts,
)
from training.jobs.evaluate import evaluate_folder


@pytest.fixture(scope="module")
def saved_model(tiny_tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval_model")
    tiny_model(len(tiny_tokenizer), context_length=32).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def evaluate_script():
    """scripts/evaluate.py as a module."""
    return load_script("evaluate")


def test_script_writes_the_same_numbers_as_the_library(evaluate_script, saved_model, tiny_tokenizer, text, tmp_path):
    text_file = tmp_path / "text.txt"
    text_file.write_text(text, encoding="utf-8")
    out = tmp_path / "metrics.json"
    argv = ["--model", str(saved_model), "--text-file", str(text_file), "--stride", "16", "--output-json", str(out)]
    assert evaluate_script.main(argv) == 0
    written = json.loads(out.read_text())
    model = MiniGPTForCausalLM.from_pretrained(saved_model)
    expected = evaluate_texts(model, tiny_tokenizer, [text], stride=16)
    assert written["loss"] == pytest.approx(expected.loss, rel=1e-6)
    assert written["bits_per_byte"] == pytest.approx(expected.bits_per_byte, rel=1e-6)
    assert written["loss_ci"] == pytest.approx(list(expected.loss_ci), rel=1e-6)
    assert written["n_bytes"] == len(text.encode()) and written["context_length"] == 32
    assert written["data"] == str(text_file)
    assert not list(tmp_path.glob(".metrics.json.*"))  # no temporary file left behind


def test_script_reads_a_dataset_and_a_yaml_config(evaluate_script, saved_model, tmp_path):
    data = tmp_path / "val.jsonl"
    data.write_text("\n".join(json.dumps({"body": t}) for t in ["one doc", "another dóc", ""]), encoding="utf-8")
    config = tmp_path / "eval.yaml"
    config.write_text(f"model: {saved_model}\ndataset: {data}\ntext_column: body\nbootstrap: 0\n")
    args = evaluate_script.parse_args([str(config), "--stride", "4"])
    assert (args.stride, args.text_column, args.bootstrap) == (4, "body", 0)
    report = evaluate_folder(args)
    assert report.n_bytes == len("one docanother dóc".encode())
    bad = tmp_path / "bad.yaml"
    bad.write_text("modle: x\n")
    with pytest.raises(ValueError, match=r"unknown keys \['modle'\]"):
        evaluate_script.parse_args([str(bad)])
    wrong_column = evaluate_script.parse_args(["--model", str(saved_model), "--dataset", str(data)])
    with pytest.raises(ValueError, match="text_column='text' is not a column"):
        evaluate_folder(wrong_column)


def test_script_errors_name_the_problem(evaluate_script, saved_model, tiny_tokenizer, tmp_path, capsys):
    def run(*argv: str) -> None:
        evaluate_folder(evaluate_script.parse_args(list(argv)))

    text_file = tmp_path / "ok.txt"
    text_file.write_text("some text", encoding="utf-8")
    with pytest.raises(FileNotFoundError, match="--model .*nope does not exist"):
        run("--model", str(tmp_path / "nope"), "--text-file", str(text_file))

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.txt is empty or whitespace-only"):
        run("--model", str(saved_model), "--text-file", str(empty))

    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("line one\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt: not valid UTF-8 at byte offset 12 \(line 2\)"):
        run("--model", str(saved_model), "--text-file", str(latin1))

    small = tmp_path / "small_vocab"
    tiny_model(300).save_pretrained(small)
    with pytest.raises(ValueError, match="tokenizer has 512 tokens but the model's vocabulary has only 300"):
        run("--model", str(small), "--tokenizer", str(saved_model), "--text-file", str(text_file))

    # Run as a script, the same errors end the process with a message and exit code 1, not a traceback.
    assert run_script("evaluate", ["--model", str(saved_model), "--text_file", str(empty)]) == 1
    assert re.search("^error: .*empty or whitespace-only", capsys.readouterr().err, re.MULTILINE)


@pytest.mark.slow
def test_script_under_accelerate_launch_with_two_processes(
    evaluate_script, saved_model, tiny_tokenizer, text, tmp_path
):
    """Two real CPU processes (gloo): sharded windows, gathered sums, one JSON file, same numbers."""
    text_file = tmp_path / "text.txt"
    text_file.write_text(text, encoding="utf-8")
    out = tmp_path / "metrics.json"
    flags = ["--model", str(saved_model), "--text-file", str(text_file), "--stride", "16", "--batch-size", "4"]
    command = two_cpu_processes(evaluate_script.__file__, *flags, "--output-json", str(out))
    # Without the CPU flag, --multi_gpu on a CPU machine starts two independent processes.
    env = {**os.environ, "ACCELERATE_USE_CPU": "1"}
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "on 2 process(es)" in run.stdout
    written = json.loads(out.read_text())
    model = MiniGPTForCausalLM.from_pretrained(saved_model)
    alone = evaluate_texts(model, tiny_tokenizer, [text], stride=16, batch_size=4)
    assert (written["n_windows"], written["n_tokens"]) == (alone.n_windows, alone.n_tokens)
    assert written["loss"] == pytest.approx(alone.loss, rel=1e-9)
    assert written["bits_per_byte"] == pytest.approx(alone.bits_per_byte, rel=1e-9)
