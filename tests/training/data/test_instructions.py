"""training/data/instructions.py: loading/validation, the loss mask, truncation, and the model's loss."""

from __future__ import annotations

import json

import datasets
import pytest
import torch
import torch.nn.functional as F

from modeling_minigpt import MiniGPTConfig, MiniGPTForCausalLM
from modeling_minigpt.files import save_figure
from tokenization.alpaca import format_prompt
from training.data.collate import IGNORE_INDEX, collate_instruction_batch
from training.data.instructions import (
    InstructionDataError,
    assemble_example,
    build_instruction_dataset,
    encode_prompt,
    format_loss_mask,
    load_instruction_records,
    loss_mask_figure,
    loss_mask_tokens,
    render_example,
)
from training.data.tasks import generate_tasks

WITH_INPUT = {"instruction": "Reverse the order of the words.", "input": "cat dog sun", "output": "sun dog cat"}
NO_INPUT = {"instruction": "What is 2 plus 3?", "output": "5"}


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------- the mask, by hand


def test_assemble_example_on_hand_written_ids():
    prompt, response, eos = [5, 6, 7], [8, 9], 0
    full = assemble_example(prompt, response, eos)
    assert full.input_ids == [5, 6, 7, 8, 9, 0]
    assert full.labels == [-100, -100, -100, 8, 9, 0]
    assert not full.truncated

    fits = assemble_example(prompt, response, eos, max_length=6)
    assert fits == full

    # Cut from the response end; the closing eos goes first, then response tokens.
    cut = assemble_example(prompt, response, eos, max_length=5)
    assert (cut.input_ids, cut.labels, cut.truncated) == ([5, 6, 7, 8, 9], [-100, -100, -100, 8, 9], True)
    cut = assemble_example(prompt, response, eos, max_length=4)
    assert (cut.input_ids, cut.labels, cut.truncated) == ([5, 6, 7, 8], [-100, -100, -100, 8], True)

    # A prompt that fills max_length leaves nothing to learn: skipped.
    assert assemble_example(prompt, response, eos, max_length=3) is None
    assert assemble_example(prompt, response, eos, max_length=2) is None

    unmasked = assemble_example(prompt, response, eos, mask_prompt=False)
    assert unmasked.labels == unmasked.input_ids == [5, 6, 7, 8, 9, 0]


def test_mask_with_input(tiny_tokenizer):
    prompt = format_prompt(WITH_INPUT["instruction"], WITH_INPUT["input"])
    assert prompt.endswith("### Input:\ncat dog sun\n\n### Response:\n")
    example = render_example(tiny_tokenizer, WITH_INPUT)
    n_prompt = len(encode(tiny_tokenizer, prompt))

    assert example.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert example.input_ids[:n_prompt] == encode_prompt(tiny_tokenizer, WITH_INPUT)
    assert IGNORE_INDEX not in example.labels[n_prompt:]
    assert example.labels[n_prompt:] == example.input_ids[n_prompt:]
    assert example.input_ids[-1] == tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.decode(example.labels[n_prompt:]) == "sun dog cat<|endoftext|>"
    assert tiny_tokenizer.decode(example.input_ids) == prompt + "sun dog cat<|endoftext|>"
    # The text view brackets exactly the response and its eos.
    view = format_loss_mask(tiny_tokenizer, example, color=False)
    assert view.count("[[") == 1
    assert view.endswith("###␣Response:↵\n[[sun␣dog␣cat<|endoftext|>]]")


def test_mask_without_input(tiny_tokenizer):
    for record in (NO_INPUT, {**NO_INPUT, "input": ""}, {**NO_INPUT, "input": None}):
        example = render_example(tiny_tokenizer, record)
        prompt = format_prompt(NO_INPUT["instruction"])
        assert "### Input" not in prompt
        n_prompt = len(encode(tiny_tokenizer, prompt))
        assert example.labels == [IGNORE_INDEX] * n_prompt + encode(tiny_tokenizer, "5") + [tiny_tokenizer.eos_token_id]
        assert tiny_tokenizer.decode(example.input_ids) == prompt + "5<|endoftext|>"


def test_mask_prompt_false_makes_every_token_a_target(tiny_tokenizer):
    example = render_example(tiny_tokenizer, WITH_INPUT, mask_prompt=False)
    assert example.labels == example.input_ids
    flags = [loss for _, loss in loss_mask_tokens(tiny_tokenizer, example)]
    # Position 0 is never predicted by the shifted loss, so the view does not mark it.
    assert flags == [False] + [True] * (len(example.input_ids) - 1)


def test_separate_prompt_and_response_tokenization_matches_joint(tiny_tokenizer):
    """The documented property: for template prompts (ending in a newline) and responses that
    start with a non-space character, ids(prompt) + ids(response) == ids(prompt + response)."""
    for record in generate_tasks(60, seed=3) + [WITH_INPUT, NO_INPUT]:
        example = render_example(tiny_tokenizer, record)
        prompt = format_prompt(record["instruction"], record.get("input"))
        assert example.input_ids[:-1] == encode(tiny_tokenizer, prompt + record["output"])


# ------------------------------------------------------------------------- dataset and collate


def test_build_dataset_truncates_and_skips_with_counts(tiny_tokenizer):
    prompt_len = len(render_example(tiny_tokenizer, NO_INPUT).input_ids) - 2  # "5" and eos are one token each
    max_length = prompt_len + 6
    long_output = {"instruction": NO_INPUT["instruction"], "output": "one two three four five six seven eight"}
    long_prompt = {"instruction": NO_INPUT["instruction"] + " Please be careful." * 5, "output": "5"}
    records = [NO_INPUT, long_output, long_prompt, long_output, WITH_INPUT]

    dataset, stats = build_instruction_dataset(records, tiny_tokenizer, max_length=max_length)

    assert (stats.records, stats.examples, stats.truncated, stats.skipped) == (5, 3, 2, 2)
    assert "2 truncated" in str(stats) and "2 skipped" in str(stats)  # WITH_INPUT's prompt is longer too
    assert dataset.column_names == ["input_ids", "labels"]
    assert dataset[0] == {
        "input_ids": render_example(tiny_tokenizer, NO_INPUT).input_ids,
        "labels": render_example(tiny_tokenizer, NO_INPUT).labels,
    }
    for row in dataset.select([1, 2]):
        assert len(row["input_ids"]) == max_length
        assert row["labels"][-1] != tiny_tokenizer.eos_token_id  # the cut response does not learn to stop
        assert row["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
        assert tiny_tokenizer.decode(row["labels"][prompt_len:]).startswith("one two")


def test_build_dataset_when_everything_is_skipped(tiny_tokenizer):
    """Nothing left is said with the counts (like a preference set with no pair), not left to torch's
    sampler ("num_samples=0"); a batch of the map that skips all its rows still has the columns."""
    with pytest.raises(InstructionDataError, match=r"no instruction example is left: 0 of 1 .* 1 skipped.*now 5\)"):
        build_instruction_dataset([NO_INPUT], tiny_tokenizer, max_length=5)
    long_prompt = {**NO_INPUT, "instruction": NO_INPUT["instruction"] * 60}
    dataset, stats = build_instruction_dataset([NO_INPUT, long_prompt], tiny_tokenizer, max_length=150)
    assert (len(dataset), stats.skipped, dataset.column_names) == (1, 1, ["input_ids", "labels"])


def test_build_dataset_reports_bad_record_index(tiny_tokenizer):
    with pytest.raises(InstructionDataError, match=r"^record 1: 'output' is missing"):
        build_instruction_dataset([NO_INPUT, {"instruction": "x"}], tiny_tokenizer)


# ------------------------------------------------------------------------- the model's loss


def test_model_loss_is_mean_cross_entropy_over_response_tokens(tiny_tokenizer):
    """model(**batch).loss equals CE computed by hand over the response + eos targets only."""
    torch.manual_seed(0)
    config = MiniGPTConfig.from_preset(
        "tiny", vocab_size=len(tiny_tokenizer), context_length=256, n_layers=2, emb_dim=32, n_heads=2
    )
    model = MiniGPTForCausalLM(config).eval()
    records = [WITH_INPUT, NO_INPUT, {"instruction": "Pick the longest word.", "input": "ox zebra", "output": "zebra"}]
    examples = [render_example(tiny_tokenizer, r) for r in records]
    batch = collate_instruction_batch([vars(e) for e in examples], tiny_tokenizer.pad_token_id)

    with torch.no_grad():
        out = model(**batch)
    log_probs = F.log_softmax(out.logits.double(), dim=-1)  # (B, T, V)

    # By hand, from the prompt lengths alone (not from the labels): token t is predicted at t-1.
    losses = []
    for row, (record, example) in enumerate(zip(records, examples, strict=True)):
        n_prompt = len(encode(tiny_tokenizer, format_prompt(record["instruction"], record.get("input"))))
        for t in range(n_prompt, len(example.input_ids)):
            losses.append(-log_probs[row, t - 1, example.input_ids[t]])
    n_targets = sum(len(encode(tiny_tokenizer, r["output"])) + 1 for r in records)
    assert len(losses) == n_targets
    torch.testing.assert_close(out.loss.double(), torch.stack(losses).mean(), rtol=1e-5, atol=1e-6)

    # Without the response mask the same batch averages over every real next token instead.
    unmasked = [render_example(tiny_tokenizer, r, mask_prompt=False) for r in records]
    batch = collate_instruction_batch([vars(e) for e in unmasked], tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        loss_all = model(**batch).loss.double()
    by_hand = [
        -log_probs[row, t - 1, e.input_ids[t]] for row, e in enumerate(unmasked) for t in range(1, len(e.input_ids))
    ]
    torch.testing.assert_close(loss_all, torch.stack(by_hand).mean(), rtol=1e-5, atol=1e-6)
    assert abs(float(loss_all) - float(out.loss)) > 1e-3


# ------------------------------------------------------------------------- loading and errors


def test_load_json_jsonl_dataset_and_list(tmp_path):
    records = [WITH_INPUT, NO_INPUT, {**NO_INPUT, "input": None, "extra": 1}]
    expected = [WITH_INPUT, {**NO_INPUT, "input": ""}, {**NO_INPUT, "input": ""}]
    (tmp_path / "data.json").write_text(json.dumps(records))
    (tmp_path / "data.jsonl").write_text(
        "\n".join(json.dumps(r) for r in records[:2]) + "\n\n" + json.dumps(records[2]) + "\n"
    )

    assert load_instruction_records(tmp_path / "data.json") == expected
    assert load_instruction_records(str(tmp_path / "data.jsonl")) == expected
    assert load_instruction_records(records) == expected
    dataset = datasets.Dataset.from_list([{**r, "input": r.get("input")} for r in records[:2]])
    assert load_instruction_records(dataset) == expected[:2]


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"input": "x", "output": "y"}, "'instruction' is missing"),
        ({"instruction": 3, "output": "y"}, "'instruction' must be a string, got int 3"),
        ({"instruction": "x"}, "'output' is missing"),
        ({"instruction": "x", "output": ["y"]}, "'output' must be a string, got list ['y']"),
        ({"instruction": "x", "output": ""}, "'output' is empty"),
        ({"instruction": "x", "output": "  \n"}, "'output' is empty"),
        ({"instruction": "x", "input": 7, "output": "y"}, "'input' must be a string, got int 7"),
        ("just text", "expected an object with 'instruction' and 'output', got str"),
    ],
)
def test_bad_records_name_file_and_index(tmp_path, bad, message):
    path = tmp_path / "data.jsonl"
    lines = [json.dumps(r) for r in (WITH_INPUT, NO_INPUT, WITH_INPUT)]
    # A blank line before the bad record: the record index (3) and the file line (5) differ.
    path.write_text("\n".join(lines) + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(InstructionDataError) as excinfo:
        load_instruction_records(path)
    assert str(excinfo.value) == f"data.jsonl record 3 (line 5): {message}"


def test_bad_json_files(tmp_path):
    (tmp_path / "obj.json").write_text('{"instruction": "x", "output": "y"}')
    with pytest.raises(InstructionDataError, match=r"obj.json: expected a JSON array of records, got a JSON dict"):
        load_instruction_records(tmp_path / "obj.json")
    (tmp_path / "bad.json").write_text('[{"instruction": "x", "output": "y"},\n {"instruction": }]')
    with pytest.raises(InstructionDataError, match=r"bad.json line 2: invalid JSON"):
        load_instruction_records(tmp_path / "bad.json")
    (tmp_path / "array.json").write_text(json.dumps([NO_INPUT, NO_INPUT, {"instruction": "x", "output": ""}]))
    with pytest.raises(InstructionDataError, match=r"^array.json record 2: 'output' is empty$"):
        load_instruction_records(tmp_path / "array.json")
    (tmp_path / "data.txt").write_text("hello")
    with pytest.raises(InstructionDataError, match=r"unsupported file type '.txt'"):
        load_instruction_records(tmp_path / "data.txt")
    with pytest.raises(InstructionDataError, match=r"no such file"):
        load_instruction_records(tmp_path / "missing.jsonl")


# ------------------------------------------------------------------------- inspection


def test_plot_loss_mask_writes_a_png(tiny_tokenizer, tmp_path):
    example = render_example(tiny_tokenizer, WITH_INPUT)
    path = save_figure(loss_mask_figure(tiny_tokenizer, example), tmp_path / "views" / "mask.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind
    colored = format_loss_mask(tiny_tokenizer, example)
    assert colored.count("\033[1;42;30m") == 1 and colored.endswith("<|endoftext|>\033[0m")
