"""training/evaluation/metrics.py: metrics on cases with known answers, strided windows, bootstrap, a classifier's
confusion matrix, and exact match (the job and its script: tests/training/jobs/test_evaluate.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers.models import tiny_model, uniform_model
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from training.data.collate import IGNORE_INDEX
from training.evaluation.metrics import (
    EvalResult,
    MetricsReport,
    bits_per_byte,
    bits_per_char,
    bootstrap_ci,
    distinct_n,
    evaluate_classifier,
    evaluate_loss,
    evaluate_texts,
    exact_match,
    exact_match_accuracy,
    exact_match_summary,
    score_generations,
    strided_perplexity,
    strided_windows,
    token_byte_table,
)

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
    token_weighted = sum(loss * n for loss, n in zip(batch_losses, batch_tokens, strict=True)) / sum(batch_tokens)
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


# ----------------------------------------------------------------------------- classification and exact match


class FixedLogits(nn.Module):
    """Predicts label `input_ids[:, 0]` for every row: a stand-in with known answers."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask=None):
        return SequenceClassifierOutput(logits=nn.functional.one_hot(input_ids[:, 0], 3).float() * 5)


def test_accuracy_and_confusion_matrix_count_every_example():
    predicted = [0, 0, 1, 2, 2, 2, 1]
    true = [0, 1, 1, 2, 0, 2, 1]
    batches = [
        {
            "input_ids": torch.tensor([[p, 9]]),
            "attention_mask": torch.ones(1, 2, dtype=torch.long),
            "labels": torch.tensor([t]),
        }
        for p, t in zip(predicted, true, strict=True)
    ]
    report = evaluate_classifier(FixedLogits(), batches, ["a", "b", "c"])
    assert report.accuracy == pytest.approx(5 / 7)
    assert report.confusion == [[1, 0, 1], [1, 2, 0], [0, 0, 2]]  # [true][predicted]
    assert report.n_examples == 7
    assert report.format_confusion().splitlines()[2].split() == ["b", "1", "2", "0"]


def test_generations_are_scored_per_record_and_per_kind():
    records = [
        {"instruction": "Add 2 and 3.", "input": "", "output": "5", "kind": "add"},
        {"instruction": "Add 1 and 1.", "input": "", "output": "2", "kind": "add"},
        {"instruction": "Repeat this phrase: cat dog", "input": "", "output": "cat dog", "kind": "repeat"},
        {"instruction": "Sort.", "input": "3, 1", "output": "1, 3", "kind": "sort"},
    ]
    rows = score_generations(records, ["5\n", "3", "cat dog", "1,3"])
    assert [r["exact_match"] for r in rows] == [True, False, True, False]
    assert rows[3] == {
        "instruction": "Sort.",
        "input": "3, 1",
        "expected": "1, 3",
        "generated": "1,3",
        "exact_match": False,
        "kind": "sort",
    }
    assert exact_match_summary(rows) == {
        "val_exact_match": 0.5,
        "exact_match_add": 0.5,
        "exact_match_repeat": 1.0,
        "exact_match_sort": 0.0,
    }


def test_exact_match_strips_only_surrounding_whitespace():
    assert exact_match(" 79\n", "79")
    assert exact_match("tree oak", "tree oak ")
    assert not exact_match("79.", "79")
    assert not exact_match("Tree oak", "tree oak")
    assert not exact_match("tree  oak", "tree oak")
    assert not exact_match("12,17", "12, 17")
    assert exact_match_accuracy(["79", " a b", "x"], ["79", "a b", "y"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="2 predictions for 3 expected"):
        exact_match_accuracy(["a", "b"], ["a", "b", "c"])
    with pytest.raises(ValueError, match="at least one"):
        exact_match_accuracy([], [])


def test_distinct_n_counts_unique_ngrams_and_sees_loops():
    assert distinct_n([1, 2, 3, 4, 5]) == 1.0
    # "x . \n" repeated 4 times: 11 bigrams, 3 of them distinct
    assert distinct_n([7, 8, 9] * 4) == pytest.approx(3 / 11)
    assert distinct_n([0] * 10) == pytest.approx(1 / 9)  # a run of one token (newlines)
    assert distinct_n([1, 2, 1, 2], n=1) == 0.5
    with pytest.raises(ValueError, match="at least 2 tokens"):
        distinct_n([5])
