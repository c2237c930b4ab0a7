"""tokenization/alpaca.py: the Alpaca prompt in one place, and the chat template that renders it byte for byte."""

from __future__ import annotations

import pytest

from tokenization import (
    alpaca_messages,
    format_example,
    format_prompt,
)

RECORDS = [
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "Translate to French.", "input": "Good morning\n  twice", "output": "Bonjour."},
    {"instruction": "Sum: {x} + {y}", "input": "{{ not jinja }} 'quotes' \"double\"", "output": "Émoji 🌍\n"},
]


def test_format_prompt_is_the_alpaca_template_exactly():
    assert format_prompt("Do it.", "") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nDo it.\n\n### Response:\n"
    )
    assert format_prompt("Do it.", "data").endswith("### Instruction:\nDo it.\n\n### Input:\ndata\n\n### Response:\n")


@pytest.mark.parametrize("record", RECORDS)
def test_chat_template_renders_the_fine_tuning_text_byte_for_byte(tiny_tokenizer, record):
    prompt, response = format_example(record)
    full = tiny_tokenizer.apply_chat_template(alpaca_messages(record), tokenize=False)
    assert full == prompt + response
    generation = tiny_tokenizer.apply_chat_template(
        alpaca_messages(record, with_response=False), tokenize=False, add_generation_prompt=True
    )
    assert generation == prompt
    ids = tiny_tokenizer.apply_chat_template(alpaca_messages(record), tokenize=True, return_dict=False)
    assert list(ids) == tiny_tokenizer.encode(prompt + response)


def test_chat_template_refuses_unknown_roles(tiny_tokenizer):
    with pytest.raises(Exception, match="got role system"):
        tiny_tokenizer.apply_chat_template([{"role": "system", "content": "x"}], tokenize=False)
