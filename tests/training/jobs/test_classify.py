"""training/jobs/classify.py: splits and labels, balanced sampling, the book's freezing recipe, and whole runs
whose saved folder serves `pipeline("text-classification")`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from helpers.runs import FINETUNE_LOOP, argument_groups, card_results, load_script, save_tiny_base
from transformers import AutoModelForSequenceClassification, pipeline

from tokenization import train_bpe
from training.data.labels import (
    TOPIC_WORDS,
    ClassificationDataError,
    generate_classification_demo,
)
from training.jobs.classify import (
    ClassifyArguments,
    EpochBalancedSampler,
    load_classification_splits,
    parse_label_weights,
    run_classification,
    set_trainable,
)
from training.run.arguments import LoopArguments
from training.run.lora import LoraArguments

# The fine-tuning runs' settings, longer and with bigger batches (a classifier head learns from scratch).
CLASSIFY_LOOP = {**FINETUNE_LOOP, "max_steps": 30, "per_device_batch_size": 16, "warmup_steps": 3, "log_every": 5}


def write_csv(path: Path, rows: list[dict[str, str]], columns=("sentence", "topic")) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows((row["text"], row["label"]) for row in rows)
    return path


def short_texts(prefixes: tuple[str, ...]) -> list[dict[str, str]]:
    """'<prefix> <topic word>': the pooled last token is the word that decides the label."""
    return [
        {"text": f"{prefix} {word}", "label": label}
        for label, words in TOPIC_WORDS.items()
        for word in words
        for prefix in prefixes
    ]


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory) -> Path:
    """A random tiny model with a BPE trained on the demo sentences, so each topic word is one token
    (the pydoc tokenizer spells 'dog' as d-o-g, and its last token 'g' also ends 'egg' and 'fog')."""
    texts = [row["text"] for row in generate_classification_demo(1500, seed=99)]
    tokenizer = train_bpe(texts, vocab_size=460, show_progress=False)
    return save_tiny_base(tmp_path_factory.mktemp("classify_base"), tokenizer, context_length=64)


def tiny_run(base: Path, out: Path, lora: dict | None = None, **overrides):
    """(ClassifyArguments, LoraArguments, LoopArguments) for a tiny run."""
    defaults = {ClassifyArguments: dict(model_path=str(base)), LoraArguments: lora or {}}
    return argument_groups({**defaults, LoopArguments: dict(CLASSIFY_LOOP, output_dir=str(out))}, overrides)


# ----------------------------------------------------------------------------- data


def test_label_weights_parse_and_reject_garbage():
    assert parse_label_weights("animals=8, food=1,weather=0.5") == {"animals": 8.0, "food": 1.0, "weather": 0.5}
    with pytest.raises(ValueError, match="name=number.*'food'"):
        parse_label_weights("animals=8,food")
    with pytest.raises(ValueError, match="name=number.*'food=x'"):
        parse_label_weights("food=x")


def test_demo_splits_are_disjoint_and_share_the_label_ids():
    splits = load_classification_splits(
        ClassifyArguments(num_demo_examples=200, validation_fraction=0.1, test_fraction=0.2)
    )
    sizes = [len(part.dataset) for part in (splits.train, splits.validation, splits.test)]
    assert sizes == [140, 20, 40]
    texts = [set(part.dataset["text"]) for part in (splits.train, splits.validation, splits.test)]
    assert sum(map(len, texts)) == 200 and len(set.union(*texts)) == 200
    assert splits.label2id == {"animals": 0, "food": 1, "weather": 2}
    assert splits.validation.label2id == splits.label2id and splits.test.label2id == splits.label2id
    again = load_classification_splits(ClassifyArguments(num_demo_examples=200))
    assert again.test.dataset["text"] == splits.test.dataset["text"]  # seeded


def test_unknown_label_in_the_validation_file_lists_the_known_ones(tmp_path):
    train = write_csv(tmp_path / "train.csv", short_texts(("the", "a")))
    validation = write_csv(
        tmp_path / "val.csv", [{"text": "a storm", "label": "weather"}, {"text": "a car", "label": "vehicles"}]
    )
    args = ClassifyArguments(
        train_file=str(train), validation_file=str(validation), text_column="sentence", label_column="topic"
    )
    with pytest.raises(
        ClassificationDataError,
        match=r"val.csv record 1 \(line 3\): unknown label 'vehicles'.*known labels: 'animals', 'food', 'weather'",
    ):
        load_classification_splits(args)


def test_a_saved_dataset_dict_gives_each_split_its_own_part(tmp_path):
    import datasets

    rows = short_texts(("the", "a"))
    folder = tmp_path / "ds"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list([r for i, r in enumerate(rows) if i % 3]),
            "test": datasets.Dataset.from_list(rows[::3]),
        }
    ).save_to_disk(folder)
    splits = load_classification_splits(
        ClassifyArguments(train_file=str(folder), test_file=str(folder), validation_fraction=0.25, test_fraction=0)
    )
    assert [len(splits.train.dataset), len(splits.validation.dataset), len(splits.test.dataset)] == [30, 10, 20]
    assert splits.test.dataset["text"] == [row["text"] for row in rows[::3]]
    with pytest.raises(ClassificationDataError, match=r"splits \['train', 'test'\] but no 'validation'"):
        load_classification_splits(ClassifyArguments(train_file=str(folder), validation_file=str(folder)))


def test_balanced_sampler_is_a_function_of_seed_and_epoch_and_balances_classes():
    labels = [0] * 900 + [1] * 100
    sampler = EpochBalancedSampler(labels, seed=7)
    first = list(sampler)
    assert list(sampler) == first and len(first) == 1000
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first
    sampler.set_epoch(0)
    assert list(sampler) == first
    minority = sum(labels[i] == 1 for i in first + second) / 2000
    assert 0.45 < minority < 0.55  # 10% of the data, drawn half of the time


# ----------------------------------------------------------------------------- freezing


def test_book_recipe_trains_only_the_last_block_final_norm_and_head(base_dir):
    model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=3)
    model = set_trainable(model, "last_block", LoraArguments())
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    recipe = [
        name
        for name, _ in model.named_parameters()
        if name.startswith(("model.trf_blocks.1.", "model.final_norm.", "score."))
    ]
    assert trainable == recipe and "model.trf_blocks.1.att.W_query.weight" in recipe and "score.weight" in recipe
    assert not {"model.tok_emb.weight", "model.pos_emb.weight", "model.trf_blocks.0.ff.fc_in.weight"} & set(trainable)
    with pytest.raises(ValueError, match="unknown fine-tuning mode"):
        set_trainable(model, "head_only", LoraArguments())


# ----------------------------------------------------------------------------- whole runs


@pytest.fixture(scope="module")
def full_run(base_dir, tmp_path_factory):
    """Full fine-tuning of the random tiny model (the book's recipe needs a pretrained body: with
    frozen random embeddings it learns this in ~100 steps, full fine-tuning in 30)."""
    folder = tmp_path_factory.mktemp("classify")
    train = write_csv(folder / "train.csv", short_texts(("the", "a", "my", "your", "some")))
    validation = write_csv(folder / "val.csv", short_texts(("our",)))
    args = tiny_run(
        base_dir,
        folder / "out",
        train_file=str(train),
        validation_file=str(validation),
        text_column="sentence",
        label_column="topic",
        test_fraction=0.2,
        finetune="full",
    )
    return run_classification(*args), folder / "out"


def test_fine_tuning_learns_the_topic(full_run):
    result, out = full_run
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["before"]["val_accuracy"] < 0.6
    assert result.validation.accuracy >= 0.9 and result.test.accuracy >= 0.9
    assert final["validation"]["n_examples"] == 30 and final["test"]["n_examples"] == 30  # 20% of 150 held out
    assert final["validation"]["labels"] == ["animals", "food", "weather"]
    assert sum(map(sum, final["validation"]["confusion_matrix"])) == 30
    assert card_results(out / "model") == {"loss": result.validation.loss, "accuracy": result.validation.accuracy}


def test_saved_classifier_loads_with_auto_class_and_pipeline(full_run):
    _, out = full_run
    model = AutoModelForSequenceClassification.from_pretrained(out / "model", trust_remote_code=True)
    assert model.config.id2label == {0: "animals", 1: "food", 2: "weather"}
    assert model.config.label2id == {"animals": 0, "food": 1, "weather": 2}
    classifier = pipeline("text-classification", model=str(out / "model"), trust_remote_code=True)
    texts = ["our cat", "our soup", "our hail", "our tiger"]
    predictions = classifier(texts)
    tokenizer = classifier.tokenizer
    with torch.no_grad():
        logits = model(**tokenizer(texts, return_tensors="pt", padding=True)).logits
    assert [p["label"] for p in predictions] == [model.config.id2label[i] for i in logits.argmax(-1).tolist()]
    assert [p["label"] for p in predictions] == ["animals", "food", "weather", "animals"]


def test_lora_with_balanced_sampling_saves_adapter_and_merged_classifier(base_dir, tmp_path):
    from peft import PeftModel

    args = tiny_run(
        base_dir,
        tmp_path / "out",
        lora=dict(lora_r=4, lora_dropout=0.0),
        finetune="lora",
        balanced_sampling=True,
        num_demo_examples=120,
        demo_label_weights="animals=4,food=1,weather=1",
        max_steps=4,
        eval_before_training=False,
    )
    result = run_classification(*args)
    assert result.adapter_dir == tmp_path / "out" / "adapter" and result.before is None
    merged = AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "out" / "model", trust_remote_code=True
    ).eval()
    base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=3)
    adapted = PeftModel.from_pretrained(base, tmp_path / "out" / "adapter").eval()
    ids = torch.randint(0, merged.config.vocab_size, (3, 9))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    run_config = json.loads((tmp_path / "out" / "run_config.json").read_text())
    assert run_config["fingerprint"]["training"]["balanced_sampling"] is True


def test_script_reports_bad_data_as_an_error_line(base_dir, tmp_path, capsys):
    script = load_script("classify")
    validation = write_csv(tmp_path / "val.csv", [{"text": "a car", "label": "vehicles"}], columns=("text", "label"))
    code = script.main(
        ["--model_path", str(base_dir), "--output_dir", str(tmp_path / "out"), "--validation_file", str(validation)]
    )
    assert code == 1 and "unknown label 'vehicles'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
