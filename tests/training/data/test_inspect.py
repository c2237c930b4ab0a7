"""training/data/inspect.py: where a batch's windows come from, and the token frequencies."""

from __future__ import annotations

import numpy as np
from helpers.texts import encode_reference

from modeling_minigpt.files import save_figure
from training.data.inspect import (
    batch_composition,
    batch_composition_figure,
    token_frequencies,
    token_frequencies_figure,
)
from training.data.windows import (
    build_lm_datasets,
    load_corpus,
    tokenize_documents,
)


def test_batch_composition_and_figures(documents, tiny_tokenizer, tmp_path):
    splits = build_lm_datasets(
        documents, tiny_tokenizer, context_length=32, stride=16, validation_fraction=0, cache_dir=tmp_path
    )
    windows = splits["train"]
    indices = [0, 1, 2, len(windows) - 1]
    table = batch_composition(windows, indices, tiny_tokenizer)
    assert table["window"].tolist() == indices
    assert table["doc_id"].tolist()[:3] == [0, 0, 0] and table["offset"].tolist()[:3] == [0, 16, 32]
    eos = tiny_tokenizer.eos_token_id
    assert table["boundaries"].tolist() == [int((np.array(windows[i]["input_ids"][:-1]) == eos).sum()) for i in indices]
    batch_png = save_figure(batch_composition_figure(table, 32), tmp_path / "figures" / "batch.png")

    tokens = tokenize_documents(load_corpus(documents, cache_dir=tmp_path), tiny_tokenizer)
    counts = token_frequencies(tokens, len(tiny_tokenizer))
    stream = np.concatenate(encode_reference(tiny_tokenizer, documents))
    np.testing.assert_array_equal(counts, np.bincount(stream, minlength=len(tiny_tokenizer)))
    assert counts[eos] == 30  # one <|endoftext|> per non-blank document
    freq_png = save_figure(token_frequencies_figure(counts, tiny_tokenizer), tmp_path / "figures" / "freq.png")
    for png in (batch_png, freq_png):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == ["batch.png", "freq.png"]  # no temp files left
