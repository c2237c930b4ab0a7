"""Evaluation metrics on cases with known answers, strided windows, bootstrap, and the CLI."""

from __future__ import annotations

import json
import math
import os
import re
import runpy
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from modeling_minigpt import MiniGPTConfig, MiniGPTForCausalLM
from training.collate import IGNORE_INDEX
from training.evaluate_folder import evaluate_folder
from training.evaluate import (
    EvalResult,
    MetricsReport,
    bits_per_byte,
    bits_per_char,
    bootstrap_ci,
    evaluate_loss,
    evaluate_texts,
    strided_perplexity,
    strided_windows,
    token_byte_table,
)

# Multi-byte characters of every UTF-8 length, so byte and character counts differ.
UNICODE_TEXT = "Naïve café — 日本語のテキスト, emoji 🙂🚀, math ∑√π, and plain ASCII.\n\tTabs  and  spaces."


def tiny_model(vocab_size: int, context_length: int = 16, seed: int = 0) -> MiniGPTForCausalLM:
    torch.manual_seed(seed)
    config = MiniGPTConfig.from_preset(
        "tiny", vocab_size=vocab_size, context_length=context_length, emb_dim=32, n_heads=2
    )
    return MiniGPTForCausalLM(config).eval()


def uniform_model(vocab_size: int, context_length: int = 16) -> MiniGPTForCausalLM:
    """Zero output head (tied to the embedding) -> all logits 0 -> uniform next-token distribution."""
    model = tiny_model(vocab_size, context_length)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    return model


@pytest.fixture(scope="module")
def text(pydoc_text: str) -> str:
    return pydoc_text[5000:6500] + UNICODE_TEXT


# ----------------------------------------------------------------------------- units and bytes


def test_units():
    assert bits_per_byte(8 * math.log(2), 4) == pytest.approx(2.0)
    assert bits_per_char(3 * math.log(2), 3) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="positive byte count"):
        bits_per_byte(1.0, 0)


def test_byte_table_counts_utf8_bytes_and_characters_exactly(tiny_tokenizer, text):
    table = token_byte_table(tiny_tokenizer)
    ids = torch.tensor(tiny_tokenizer(text, add_special_tokens=False)["input_ids"])
    assert table.exact
    assert int(table.n_bytes[ids].sum()) == len(text.encode("utf-8"))
    assert int(table.n_chars[ids].sum()) == len(text)
    # Special tokens are not text.
    assert table.n_bytes[tiny_tokenizer.eos_token_id] == 0


def test_byte_table_is_flagged_approximate_for_non_byte_level_tokenizers():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "wörld": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    table = token_byte_table(tokenizer)
    assert not table.exact
    assert table.n_bytes.tolist() == [0, 5, 6] and table.n_chars.tolist() == [0, 5, 5]


# ----------------------------------------------------------------------------- known answers


def test_uniform_logits_give_log2_vocab_bits_per_token(tiny_tokenizer, text):
    vocab = len(tiny_tokenizer)
    report = evaluate_texts(uniform_model(vocab), tiny_tokenizer, [text], stride=8, n_bootstrap=200)
    n_text_tokens = len(tiny_tokenizer(text, add_special_tokens=False)["input_ids"])
    # The prepended BOS lets every token of the text be scored; the BOS itself is not.
    assert report.n_tokens == n_text_tokens
    assert (report.n_bytes, report.n_chars) == (len(text.encode("utf-8")), len(text))
    assert report.loss == pytest.approx(math.log(vocab), rel=1e-6)
    assert report.perplexity == pytest.approx(vocab, rel=1e-5)
    assert report.bits_per_token == pytest.approx(math.log2(vocab), rel=1e-6)
    assert report.bits_per_byte == pytest.approx(math.log2(vocab) * n_text_tokens / len(text.encode()), rel=1e-6)
    assert report.bits_per_char == pytest.approx(math.log2(vocab) * n_text_tokens / len(text), rel=1e-6)
    # Every window has the same per-token loss, so the interval collapses onto it.
    assert report.loss_ci == pytest.approx((math.log(vocab), math.log(vocab)), rel=1e-6)
    assert report.bits_per_byte_ci[0] <= report.bits_per_byte <= report.bits_per_byte_ci[1]


def test_document_boundaries_are_context_not_targets(tiny_tokenizer):
    docs = ["first document.", "", "second, ünïcode document!"]
    report = evaluate_texts(uniform_model(len(tiny_tokenizer)), tiny_tokenizer, docs, n_bootstrap=0)
    n_doc_tokens = sum(len(tiny_tokenizer(d, add_special_tokens=False)["input_ids"]) for d in docs)
    assert report.n_tokens == n_doc_tokens
    assert report.n_bytes == sum(len(d.encode()) for d in docs)
    assert report.loss_ci is None  # bootstrap disabled


# ----------------------------------------------------------------------------- strided windows


@pytest.mark.parametrize(
    "n, context_length, stride",
    [(2, 8, 4), (9, 8, 8), (10, 8, 8), (40, 8, 3), (41, 8, 8), (57, 16, 5), (30, 7, 1)],
)
def test_strided_windows_score_every_token_once_with_enough_context(n, context_length, stride):
    ids = torch.arange(n)  # ids are positions, so the windows reveal what they score
    windows = strided_windows(ids, context_length, stride)
    inputs, targets = windows["input_ids"], windows["shift_labels"]
    scored = targets != IGNORE_INDEX
    assert inputs.shape[1] == min(context_length, n - 1)
    assert sorted(targets[scored].tolist()) == list(range(1, n))  # each of the n - 1 targets once
    assert torch.equal(targets[scored], inputs[scored] + 1)  # the target of a position is the next token
    # Context of a scored target = inputs from the window's start up to it.
    context = (torch.arange(inputs.shape[1]) + 1).expand_as(inputs)[scored]
    assert torch.all(context >= torch.clamp(targets[scored], max=context_length - stride + 1))


def test_strided_windows_respect_ignored_labels():
    ids = torch.arange(20)
    labels = ids.clone()
    labels[[0, 7, 13]] = IGNORE_INDEX
    targets = strided_windows(ids, 6, 4, labels)["shift_labels"]
    assert sorted(targets[targets != IGNORE_INDEX].tolist()) == [t for t in range(1, 20) if t not in (7, 13)]


def test_strided_windows_reject_bad_arguments():
    with pytest.raises(ValueError, match="stride must be in"):
        strided_windows(torch.arange(10), 4, 5)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        strided_windows(torch.arange(1), 4, 2)


def test_stride_equal_to_context_is_non_overlapping_chunks_by_hand():
    model, L = tiny_model(97, context_length=8), 8
    ids = torch.randint(0, 97, (3 * L + 1,), generator=torch.Generator().manual_seed(1))
    result = strided_perplexity(model, ids, context_length=L, stride=L, batch_size=2)
    with torch.no_grad():
        by_hand = [
            F.cross_entropy(model(ids[None, c : c + L]).logits[0], ids[c + 1 : c + L + 1], reduction="sum").item()
            for c in range(0, 3 * L, L)
        ]
    assert result.per_window_tokens.tolist() == [L, L, L]
    assert result.per_window_nats.tolist() == pytest.approx(by_hand, rel=1e-5)
    assert result.loss == pytest.approx(sum(by_hand) / (3 * L), rel=1e-5)


def test_overlapping_stride_matches_per_token_brute_force():
    """Each target scored with exactly the context the recipe promises, computed one token at a time."""
    model, L, stride = tiny_model(97, context_length=8), 8, 3
    ids = torch.randint(0, 97, (23,), generator=torch.Generator().manual_seed(2))
    n_targets = len(ids) - 1
    last_begin = n_targets - L
    expected = 0.0
    with torch.no_grad():
        for j in range(1, len(ids)):
            # First window (starts 0, stride, 2*stride, ..., and finally last_begin) whose inputs reach j - 1.
            begin = min(max(0, math.ceil((j - L) / stride) * stride), last_begin)
            logits = model(ids[None, begin:j]).logits[0, -1]
            expected += F.cross_entropy(logits, ids[j]).item()
    result = strided_perplexity(model, ids, context_length=L, stride=stride, batch_size=3)
    assert result.n_tokens == n_targets
    assert result.total_nats == pytest.approx(expected, rel=1e-5)


def test_short_text_equals_the_models_own_loss():
    model = tiny_model(97, context_length=16)
    ids = torch.randint(0, 97, (12,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = model(ids[None], labels=ids[None]).loss.item()
    assert strided_perplexity(model, ids).loss == pytest.approx(reference, rel=1e-5)


def test_out_of_range_ids_and_context_are_clear_errors():
    model = tiny_model(97, context_length=8)
    with pytest.raises(ValueError, match="token id 150 is out of range for the model's vocabulary of 97"):
        strided_perplexity(model, [1, 2, 150])
    with pytest.raises(ValueError, match="exceeds the model's maximum of 8"):
        strided_perplexity(model, [1, 2, 3], context_length=9)


# ----------------------------------------------------------------------------- dataloader path


def _batches(ids: torch.Tensor, layout: str) -> list[dict[str, torch.Tensor]]:
    """Two batches of different sizes over the same windows, in one of the three layouts."""
    windows = ids.view(-1, 9)  # (6, 9): 8 inputs + 1 target each
    windows_targets = windows[:, 1:].clone()
    windows_targets[0, :5] = IGNORE_INDEX  # unequal token counts per batch
    out = []
    for rows in (slice(0, 2), slice(2, 6)):
        if layout == "shift_labels":
            out.append({"input_ids": windows[rows, :-1], "shift_labels": windows_targets[rows]})
        else:  # unshifted HF labels over the full window
            labels = torch.cat([windows[rows, :1], windows_targets[rows]], dim=1)
            out.append({"input_ids": windows[rows], "labels": labels})
    return out


def test_loss_is_token_weighted_not_a_mean_of_batch_means():
    model = tiny_model(97, context_length=16)
    ids = torch.randint(0, 97, (54,), generator=torch.Generator().manual_seed(4))
    shifted = evaluate_loss(model, _batches(ids, "shift_labels"))
    unshifted = evaluate_loss(model, _batches(ids, "labels"))
    assert shifted.n_tokens == unshifted.n_tokens == 6 * 8 - 5
    assert shifted.loss == pytest.approx(unshifted.loss, rel=1e-6)
    with torch.no_grad():
        batch_losses = [model(**b).loss.item() for b in _batches(ids, "shift_labels")]
        batch_tokens = [int((b["shift_labels"] != IGNORE_INDEX).sum()) for b in _batches(ids, "shift_labels")]
    token_weighted = sum(l * n for l, n in zip(batch_losses, batch_tokens)) / sum(batch_tokens)
    assert shifted.loss == pytest.approx(token_weighted, rel=1e-5)
    assert abs(shifted.loss - sum(batch_losses) / 2) > 1e-4  # the naive mean differs here


def test_evaluate_loss_restores_training_mode_and_limits_batches():
    model = tiny_model(97).train()
    ids = torch.randint(0, 97, (54,), generator=torch.Generator().manual_seed(5))
    result = evaluate_loss(model, _batches(ids, "shift_labels"), max_batches=1)
    assert model.training
    assert result.n_windows == 2 and result.n_tokens == 2 * 8 - 5


def test_stopping_early_releases_an_accelerate_dataloader():
    """After `max_batches`, the training loop's gradient sync must not see the eval loader as active."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    try:
        accelerator = Accelerator(cpu=True)
        ids = torch.randint(0, 97, (54,), generator=torch.Generator().manual_seed(7))
        windows = strided_windows(ids, 8, 8)
        rows = [{key: value[i] for key, value in windows.items()} for i in range(len(windows["input_ids"]))]
        loader = accelerator.prepare(torch.utils.data.DataLoader(rows, batch_size=2))
        result = evaluate_loss(tiny_model(97), loader, accelerator, max_batches=1)
        assert result.n_windows == 2
        assert not accelerator.gradient_state.in_dataloader
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def test_empty_evaluation_is_a_clear_error():
    with pytest.raises(ValueError, match="scored no tokens"):
        evaluate_loss(tiny_model(97), [])


# ----------------------------------------------------------------------------- bootstrap


def test_bootstrap_is_a_ratio_of_sums_over_windows():
    # Window ratios are 2 and 1. Resampling two windows gives 2, 1 or, mixed, (2+3)/(1+3) = 1.25
    # (half the time); a mean of per-window ratios would give 1.5 instead.
    nats, tokens = [2.0, 3.0], [1, 3]
    assert bootstrap_ci(nats, tokens, n_resamples=4000, alpha=0.6) == pytest.approx((1.25, 1.25))
    assert bootstrap_ci(nats, tokens, n_resamples=4000, alpha=0.05) == pytest.approx((1.0, 2.0))
    assert bootstrap_ci(nats, tokens, seed=7) == bootstrap_ci(nats, tokens, seed=7)
    with pytest.raises(ValueError, match="at least 2 windows"):
        bootstrap_ci([1.0], [1])


def test_bootstrap_interval_narrows_with_more_windows():
    gen = torch.Generator().manual_seed(0)
    widths = []
    for n in (20, 2000):
        tokens = torch.full((n,), 10)
        nats = 10 * (3 + 0.5 * torch.randn(n, generator=gen, dtype=torch.float64))
        low, high = bootstrap_ci(nats, tokens, n_resamples=500)
        assert low < float(nats.sum() / tokens.sum()) < high
        widths.append(high - low)
    # Standard error shrinks like 1/sqrt(n): 100x the windows, ~10x narrower.
    assert 5 < widths[0] / widths[1] < 20


def test_report_to_dict_is_json_ready():
    result = EvalResult(torch.tensor([3.0, 5.0], dtype=torch.float64), torch.tensor([2, 2]))
    report = MetricsReport.from_result(result, n_resamples=100)
    loaded = json.loads(json.dumps(report.to_dict()))
    assert loaded["loss"] == 2.0 and loaded["n_tokens"] == 4 and loaded["bits_per_byte"] is None
    assert loaded["loss_ci"][0] <= 2.0 <= loaded["loss_ci"][1]
    assert "loss (nats/token)" in report.to_text()


# ----------------------------------------------------------------------------- the script


@pytest.fixture(scope="module")
def saved_model(tiny_tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval_model")
    tiny_model(len(tiny_tokenizer), context_length=32).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def evaluate_script():
    """scripts/evaluate.py as a module (loaded by path: `evaluate` is also a PyPI package's name)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "evaluate.py"
    spec = importlib.util.spec_from_file_location("minigpt_evaluate_script", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve field types through sys.modules
    spec.loader.exec_module(module)
    return module


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
    with pytest.raises(FileNotFoundError, match="model folder .*nope does not exist"):
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
    argv = ["evaluate.py", "--model", str(saved_model), "--text-file", str(empty)]
    with pytest.MonkeyPatch.context() as patch, pytest.raises(SystemExit) as exit_:
        patch.setattr(sys, "argv", argv)
        runpy.run_path(evaluate_script.__file__, run_name="__main__")
    assert exit_.value.code == 1
    assert re.search("^error: .*empty or whitespace-only", capsys.readouterr().err, re.MULTILINE)


@pytest.mark.slow
def test_script_under_accelerate_launch_with_two_processes(
    evaluate_script, saved_model, tiny_tokenizer, text, tmp_path
):
    """Two real CPU processes (gloo): sharded windows, gathered sums, one JSON file, same numbers."""
    text_file = tmp_path / "text.txt"
    text_file.write_text(text, encoding="utf-8")
    out = tmp_path / "metrics.json"
    with socket.socket() as probe:  # a free port, so concurrent runs do not collide
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
        evaluate_script.__file__, "--model", str(saved_model), "--text-file", str(text_file),
        "--stride", "16", "--batch-size", "4", "--output-json", str(out),
    ]
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
