"""tokenization/visualize.py: BPE made visible, checked against the tokenizer itself."""

from __future__ import annotations

from pathlib import Path

from helpers.texts import STRESS_TEXT

from modeling_minigpt.files import save_figure
from tokenization import (
    EOS_TOKEN,
    format_merge_table,
    format_merge_trace,
    learned_merges,
    merge_table,
    merge_trace,
    merge_trace_figure,
    token_boundaries_figure,
    token_boundaries_html,
    train_bpe,
    train_reference_bpe,
)
from tokenization.visualize import token_spans


def png_ok(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 2000


def test_merge_trace_reproduces_the_tokenizer(tiny_tokenizer, tmp_path):
    text = "The lowest tokenization 🌍 café" + EOS_TOKEN + "  tabs\there"
    traces = merge_trace(tiny_tokenizer, text)
    assert [token for trace in traces for token in trace.tokens] == tiny_tokenizer.tokenize(text)
    merges = learned_merges(tiny_tokenizer)
    for trace in traces:
        for step in trace.steps:
            assert merges[step.rank] == step.pair and step.result == "".join(step.pair)
    assert [t.special for t in traces].count(True) == 1
    printed = format_merge_trace(traces)
    assert "'␣lowest'  bytes: ␣ l o w e s t" in printed and "(special token, never merged)" in printed
    assert png_ok(save_figure(merge_trace_figure(traces), tmp_path / "trace.png"))


def test_merge_table_frequencies_are_the_trainers_counts(pydoc_text):
    corpus = [pydoc_text[:60_000]]
    tokenizer = train_bpe(corpus, 400, show_progress=False)
    rows = merge_table(tokenizer, corpus, n=25)
    reference = train_reference_bpe(corpus, 400)
    assert [row.frequency for row in rows] == reference.counts[:25]
    assert [(row.left, row.right) for row in rows] == reference.merges[:25]
    table = format_merge_table(rows)
    assert table.count("\n") == 26 and f"| 0 | `{rows[0].left.replace('Ġ', '␣')}`" in table


def test_token_boundaries_cover_the_text_once(tiny_tokenizer, tmp_path):
    spans = token_spans(tiny_tokenizer, STRESS_TEXT)
    assert "".join(STRESS_TEXT[s.start : s.end] for s in spans) == STRESS_TEXT
    assert len(spans) == len(tiny_tokenizer.encode(STRESS_TEXT))
    page = token_boundaries_html(tiny_tokenizer, STRESS_TEXT)
    assert page.count("<span ") == len(spans) and f"{len(spans):,} tokens" in page
    assert png_ok(save_figure(token_boundaries_figure(tiny_tokenizer, STRESS_TEXT), tmp_path / "tokens.png"))
