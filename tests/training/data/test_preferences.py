"""training/data/preferences.py (and the preference pieces of instruct_data and tasks): records,
one loss mask per response, truncation, batches, the embedded preference tasks, the book's file."""

from __future__ import annotations

import json

import datasets
import pytest
import torch

from tokenization.alpaca import format_prompt
from training.data.collate import IGNORE_INDEX
from training.data.instructions import InstructionDataError, encode_prompt, load_instruction_records, render_example
from training.data.preferences import (
    build_preference_dataset,
    collate_preference_batch,
    load_preference_records,
    pairs_digest,
    render_pairs,
)
from training.data.tasks import NEAR_MISSES, make_preference_splits, make_task_splits

PAIRS = [
    {"instruction": "Name a colour.", "input": "", "chosen": "Blue.", "rejected": "A colour is a thing."},
    {"instruction": "Sum the numbers.", "input": "2 and 3", "chosen": "5", "rejected": "The sum is 6, I think."},
    {"instruction": "Translate to French.", "input": "Good morning", "chosen": "Bonjour.", "rejected": "Bonsoir."},
]


def as_sft(record: dict, side: str) -> dict:
    return {"instruction": record["instruction"], "input": record["input"], "output": record[side]}


# ----------------------------------------------------------------------------- one mask per response


def test_each_response_is_rendered_exactly_as_its_sft_example(tiny_tokenizer):
    for pair, record in zip(render_pairs(tiny_tokenizer, PAIRS), PAIRS, strict=True):
        for side in ("chosen", "rejected"):
            assert getattr(pair, side) == render_example(tiny_tokenizer, as_sft(record, side))


def test_masks_cover_only_the_response_tokens_and_eos(tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id
    dataset, stats = build_preference_dataset(PAIRS, tiny_tokenizer)
    assert stats.pairs == 3 and stats.truncated == stats.too_long == stats.identical == 0
    batch = collate_preference_batch([dataset[i] for i in range(3)], tiny_tokenizer.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[0] == 6  # (2B, T): the three chosen rows, then the three rejected
    for row, (side, record) in enumerate([(s, r) for s in ("chosen", "rejected") for r in PAIRS]):
        ids, labels, attention = batch["input_ids"][row], batch["labels"][row], batch["attention_mask"][row]
        prompt = encode_prompt(tiny_tokenizer, record)
        response = tiny_tokenizer(record[side], add_special_tokens=False)["input_ids"]
        length = len(prompt) + len(response) + 1
        assert ids[:length].tolist() == [*prompt, *response, eos]
        # Targets: the response and its eos, nothing of the prompt, nothing of the padding.
        assert labels[: len(prompt)].eq(IGNORE_INDEX).all()
        assert labels[len(prompt) : length].tolist() == [*response, eos]
        assert labels[length:].eq(IGNORE_INDEX).all() and attention[length:].eq(0).all()
        assert attention[:length].eq(1).all()
        assert tiny_tokenizer.decode(ids[labels != IGNORE_INDEX]) == record[side] + tiny_tokenizer.eos_token


def test_truncation_keeps_the_prompt_whole_or_drops_the_pair(tiny_tokenizer):
    short = {"instruction": "Say it.", "input": "", "chosen": "one two three four", "rejected": "five six seven"}
    long = {**short, "input": "a long input " * 20}
    room = 2  # response tokens left after the short prompt: both responses are longer
    max_length = len(encode_prompt(tiny_tokenizer, short)) + room
    assert len(encode_prompt(tiny_tokenizer, long)) >= max_length
    dataset, stats = build_preference_dataset([short, long, short], tiny_tokenizer, max_length=max_length)
    assert (stats.pairs, stats.truncated, stats.too_long, len(dataset)) == (2, 2, 1, 2)
    assert "1 dropped (prompt alone fills max_length)" in str(stats) and stats.first_too_long == "'Say it.'"
    prompt = encode_prompt(tiny_tokenizer, short)
    for side in ("chosen", "rejected"):  # the prompt whole, the response cut to `room` tokens (and no eos)
        response = tiny_tokenizer(short[side], add_special_tokens=False)["input_ids"]
        assert dataset[0][f"{side}_input_ids"] == [*prompt, *response[:room]]
        assert dataset[0][f"{side}_labels"] == [IGNORE_INDEX] * len(prompt) + response[:room]
    with pytest.raises(InstructionDataError, match=r"no preference pair of the 1 held-out records is left.*max_length"):
        build_preference_dataset([long], tiny_tokenizer, max_length=max_length, what="held-out records")


def test_pairs_with_identical_responses_are_dropped_and_counted(tiny_tokenizer):
    same = {"instruction": "Say hi.", "input": "", "chosen": "Hi.", "rejected": "Hi."}
    dataset, stats = build_preference_dataset([*PAIRS, same], tiny_tokenizer)
    assert (stats.records, stats.pairs, stats.identical, len(dataset)) == (4, 3, 1, 3)


def test_collate_carries_a_precomputed_reference_in_row_order(tiny_tokenizer):
    dataset, _ = build_preference_dataset(PAIRS, tiny_tokenizer)
    dataset = dataset.add_column("reference_logps", [[-1.5, -2.5], [-3.5, -4.5], [-5.5, -6.5]])
    batch = collate_preference_batch([dataset[0], dataset[2]], tiny_tokenizer.pad_token_id)
    assert batch["reference_logps"].dtype == torch.float64
    assert batch["reference_logps"].tolist() == [-1.5, -5.5, -2.5, -6.5]  # chosen rows, then rejected rows


def test_pairs_digest_changes_with_any_token(tiny_tokenizer):
    dataset, _ = build_preference_dataset(PAIRS, tiny_tokenizer)
    other, _ = build_preference_dataset([PAIRS[0], PAIRS[1], {**PAIRS[2], "rejected": "Bonsoir!"}], tiny_tokenizer)
    assert pairs_digest(dataset) == pairs_digest(dataset) != pairs_digest(other)


# ----------------------------------------------------------------------------- records


def test_preference_records_from_json_jsonl_and_a_dataset(tmp_path):
    book_style = [{**r, "output": r["chosen"]} for r in PAIRS]  # the book's file also has the SFT answer
    (tmp_path / "p.json").write_text(json.dumps(book_style))
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    expected = [dict(r) for r in PAIRS]
    assert load_preference_records(tmp_path / "p.json") == expected  # `output` dropped
    assert load_preference_records(str(tmp_path / "p.jsonl")) == expected
    assert load_preference_records(datasets.Dataset.from_list(PAIRS)) == expected


def test_bad_preference_records_name_the_file_and_record(tmp_path):
    sft = tmp_path / "sft.json"
    sft.write_text(json.dumps([{"instruction": "a", "output": "b"}]))
    with pytest.raises(InstructionDataError, match=r"sft.json record 0: no 'chosen' and 'rejected'.*scripts/sft.py"):
        load_preference_records(sft)
    half = tmp_path / "half.jsonl"
    half.write_text(json.dumps(PAIRS[0]) + "\n" + json.dumps({"instruction": "a", "chosen": "b"}) + "\n")
    with pytest.raises(InstructionDataError, match=r"half.jsonl record 1 \(line 2\): 'rejected' is missing"):
        load_preference_records(half)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps([{**PAIRS[0], "chosen": ["Blue."]}]))
    with pytest.raises(InstructionDataError, match=r"wrong.json record 0: 'chosen' must be a string, got list"):
        load_preference_records(wrong)


def test_sft_refuses_a_preference_file_and_points_to_dpo(tmp_path):
    path = tmp_path / "prefs.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}, {**PAIRS[0], "output": "Blue."}]))
    with pytest.raises(InstructionDataError, match=r"prefs.json record 1: has 'chosen'/'rejected'.*scripts/dpo.py"):
        load_instruction_records(path)


# ----------------------------------------------------------------------------- embedded preference tasks


def test_embedded_preference_pairs_are_the_task_answer_against_a_near_miss():
    train, heldout = make_preference_splits(120, 60, seed=3)
    sft_train, sft_heldout = make_task_splits(120, 60, seed=3)
    assert make_preference_splits(120, 60, seed=3) == (train, heldout)  # seeded
    assert make_preference_splits(30, 60, seed=3)[1] == heldout  # held-out does not depend on n_train
    for pair, task in zip(heldout + train, sft_heldout + sft_train, strict=True):
        assert (pair["instruction"], pair["input"], pair["chosen"], pair["kind"]) == (
            task["instruction"],
            task["input"],
            task["output"],
            task["kind"],
        )
    assert {p["kind"] for p in heldout} == set(NEAR_MISSES)
    prompts = lambda records: {(r["instruction"], r["input"]) for r in records}  # noqa: E731
    assert not prompts(train) & prompts(heldout)
    for pair in train + heldout:
        chosen, rejected, kind = pair["chosen"], pair["rejected"], pair["kind"]
        assert rejected != chosen
        if kind in ("repeat", "reverse"):  # the same words, one neighbouring pair swapped
            a, b = chosen.split(" "), rejected.split(" ")
            assert sorted(a) == sorted(b) and sum(x != y for x, y in zip(a, b, strict=True)) == 2
        elif kind == "sort":
            a, b = chosen.split(", "), rejected.split(", ")
            assert sorted(a) == sorted(b) and [int(x) for x in b] != sorted(int(x) for x in b)
        elif kind == "add":
            assert abs(int(rejected) - int(chosen)) == 1 and int(rejected) >= 0
        elif kind == "longest":
            assert rejected in pair["input"].split(" ") and len(rejected) < len(chosen)
        else:
            assert f": {rejected}" in pair["input"]  # another field's value


# ----------------------------------------------------------------------------- the book's preference data


def test_the_books_preference_file(shared_data, gpt2_pair):
    path = shared_data / "book" / "instruction-data-with-preference.json"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    tokenizer, _ = gpt2_pair
    records = load_preference_records(path)
    assert len(records) == 1100 and set(records[0]) == {"instruction", "input", "chosen", "rejected"}
    dataset, stats = build_preference_dataset(records, tokenizer, max_length=1024)
    identical = sum(r["chosen"] == r["rejected"] for r in records)
    assert stats.identical == identical and stats.pairs == 1100 - identical == len(dataset)
    row = dataset[0]
    kept = next(r for r in records if r["chosen"] != r["rejected"])
    prompt = tokenizer(format_prompt(kept["instruction"], kept["input"]), add_special_tokens=False)["input_ids"]
    assert row["chosen_input_ids"][: len(prompt)] == prompt and row["chosen_input_ids"][-1] == tokenizer.eos_token_id
    with pytest.raises(InstructionDataError, match="record 0: has 'chosen'/'rejected'.*scripts/dpo.py"):
        load_instruction_records(path)
