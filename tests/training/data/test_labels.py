"""training/data/labels.py: loading and label maps, the embedded demo, padded batches, balanced sampling."""

from __future__ import annotations

import json
from collections import Counter

import datasets
import pytest
import torch

from modeling_minigpt import MiniGPTConfig, MiniGPTForSequenceClassification
from training.data.collate import collate_classification_batch
from training.data.labels import (
    TOPIC_WORDS,
    ClassificationDataError,
    balanced_sampler,
    generate_classification_demo,
    load_classification_data,
    tokenize_classification_dataset,
)

ROWS = [
    {"text": "the soup was hot", "label": "food"},
    {"text": "a wolf ran past", "label": "animals"},
    {"text": "more bread please", "label": "food"},
]


def test_load_csv_json_jsonl_dataset_and_list(tmp_path):
    (tmp_path / "d.csv").write_text(
        'text,label\nthe soup was hot,food\n"a wolf\nran past",animals\nmore bread please,food\n'
    )
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS))
    sources = [
        tmp_path / "d.csv",
        tmp_path / "d.json",
        str(tmp_path / "d.jsonl"),
        datasets.Dataset.from_list(ROWS),
        ROWS,
    ]
    for source in sources:
        data = load_classification_data(source)
        assert data.label2id == {"animals": 0, "food": 1}
        assert data.id2label == {0: "animals", 1: "food"}
        assert data.dataset["label"] == [1, 0, 1]
        assert data.dataset["text"][0] == "the soup was hot"
    assert load_classification_data(tmp_path / "d.csv").dataset["text"][1] == "a wolf\nran past"


def test_custom_columns_and_integer_labels_sort_numerically():
    rows = [{"sentence": f"s{i}", "y": y} for i, y in enumerate([10, 2, 1, 2])]
    data = load_classification_data(rows, text_column="sentence", label_column="y")
    assert data.label2id == {"1": 0, "2": 1, "10": 2}
    assert data.dataset["label"] == [2, 1, 0, 1]


def test_given_label2id_is_used_and_unknown_labels_list_the_known_ones(tmp_path):
    data = load_classification_data(ROWS, label2id={"food": 0, "animals": 1, "weather": 2})
    assert data.dataset["label"] == [0, 1, 0]
    assert data.id2label == {0: "food", 1: "animals", 2: "weather"}

    (tmp_path / "d.csv").write_text("text,label\nhot soup,food\nwet day,rainy\ncold day,rainy\nfog,misty\n")
    with pytest.raises(ClassificationDataError) as excinfo:
        load_classification_data(tmp_path / "d.csv", label2id={"food": 0, "animals": 1})
    assert str(excinfo.value) == (
        "d.csv record 1 (line 3): unknown label 'rainy' (3 records have labels not in label2id: 'misty', 'rainy'); "
        "known labels: 'food', 'animals'"
    )
    with pytest.raises(ClassificationDataError, match=r"label2id ids must be 0..1, each once"):
        load_classification_data(ROWS, label2id={"food": 0, "animals": 2})


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"text": "x"}, "'label' is missing (columns present: text)"),
        ({"body": "x", "label": "food"}, "'text' is missing (columns present: body, label)"),
        ({"text": "   ", "label": "food"}, "'text' must be a non-empty string, got '   '"),
        ({"text": "x", "label": 1.5}, "'label' must be a non-empty string or an integer, got 1.5"),
        ({"text": "x", "label": True}, "'label' must be a non-empty string or an integer, got True"),
    ],
)
def test_bad_records_name_file_and_index(tmp_path, bad, message):
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in [*ROWS, bad]))
    with pytest.raises(ClassificationDataError) as excinfo:
        load_classification_data(tmp_path / "d.jsonl")
    assert str(excinfo.value) == f"d.jsonl record 3 (line 4): {message}"


def test_demo_label_follows_from_the_text():
    records = generate_classification_demo(600, seed=0)
    assert records == generate_classification_demo(600, seed=0)
    assert records != generate_classification_demo(600, seed=1)
    assert len({r["text"] for r in records}) == 600
    word_topic = {word: topic for topic, words in TOPIC_WORDS.items() for word in words}
    for record in records:
        topics = [word_topic[w] for w in record["text"].split() if w in word_topic]
        assert topics == [record["label"]], record
    counts = Counter(r["label"] for r in records)
    assert set(counts) == set(TOPIC_WORDS) and min(counts.values()) > 150  # equal weights by default


def test_demo_label_weights_make_an_imbalanced_set():
    counts = Counter(
        r["label"]
        for r in generate_classification_demo(1000, seed=0, label_weights={"animals": 8, "food": 1, "weather": 1})
    )
    assert 750 < counts["animals"] < 850 and counts["food"] + counts["weather"] == 1000 - counts["animals"]
    assert set(r["label"] for r in generate_classification_demo(50, seed=0, label_weights={"food": 1})) == {"food"}
    with pytest.raises(ValueError, match=r"unknown demo labels \['sports'\]; known labels: animals, food, weather"):
        generate_classification_demo(10, seed=0, label_weights={"sports": 1})


def test_padded_batches_classify_like_single_rows(tiny_tokenizer):
    """Loaded, tokenized and collated data pools the last real token whichever side is padded."""
    data = load_classification_data(generate_classification_demo(6, seed=3))
    tokenized = tokenize_classification_dataset(data.dataset, tiny_tokenizer, max_length=22)
    assert tokenized.column_names == ["input_ids", "labels"]
    assert tokenized["labels"] == data.dataset["label"]
    lengths = [len(ids) for ids in tokenized["input_ids"]]
    full = [len(tiny_tokenizer(text)["input_ids"]) for text in data.dataset["text"]]
    assert lengths == [min(n, 22) for n in full] and max(full) > 22 and min(lengths) < 22, full
    longest = full.index(max(full))
    assert tokenized["input_ids"][longest] == tiny_tokenizer(data.dataset["text"][longest])["input_ids"][:22]

    torch.manual_seed(0)
    config = MiniGPTConfig.from_preset(
        "tiny",
        vocab_size=len(tiny_tokenizer),
        n_layers=2,
        emb_dim=32,
        n_heads=2,
        num_labels=len(data.label2id),
        id2label=data.id2label,
        label2id=data.label2id,
    )
    model = MiniGPTForSequenceClassification(config).eval()
    rows = list(tokenized)
    with torch.no_grad():
        alone = torch.cat(
            [model(**collate_classification_batch([r], tiny_tokenizer.pad_token_id)).logits for r in rows]
        )
        for side in ("right", "left"):
            batch = collate_classification_batch(rows, tiny_tokenizer.pad_token_id, padding_side=side)
            torch.testing.assert_close(model(**batch).logits, alone, rtol=1e-4, atol=1e-5)


def test_balanced_sampler_draws_classes_equally():
    labels = [0] * 90 + [1] * 9 + [2] * 1
    sampler = balanced_sampler(labels, num_samples=30_000, seed=0)
    counts = Counter(labels[i] for i in sampler)
    assert all(abs(counts[c] / 30_000 - 1 / 3) < 0.02 for c in (0, 1, 2)), counts
    assert list(balanced_sampler(labels, seed=4)) == list(balanced_sampler(labels, seed=4))
    assert len(list(balanced_sampler(labels))) == 100
