"""tokenization/alpaca.py: the Alpaca prompt in one place, and the chat template that renders it byte for byte.

The template closes each answer with eos, takes a system message and several turns, and marks the assistant's
tokens; the reference for every rendering is the project's own pieces (`format_prompt`, ALPACA_TEMPLATE) and its
fine-tuning renderer (`training.data.instructions.render_example`, the one loss mask).
"""

from __future__ import annotations

import pytest

from tokenization import EOS_TOKEN
from tokenization.alpaca import ALPACA_TEMPLATE, alpaca_messages, format_example, format_prompt
from training.data.instructions import IGNORE_INDEX, render_example

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
    assert full == prompt + response + EOS_TOKEN  # fine-tuning closes each response with eos
    generation = tiny_tokenizer.apply_chat_template(
        alpaca_messages(record, with_response=False), tokenize=False, add_generation_prompt=True
    )
    assert generation == prompt
    ids = tiny_tokenizer.apply_chat_template(alpaca_messages(record), tokenize=True, return_dict=False)
    assert list(ids) == tiny_tokenizer.encode(prompt + response + EOS_TOKEN)


def test_chat_template_refuses_unknown_roles(tiny_tokenizer):
    with pytest.raises(Exception, match="got role tool"):
        tiny_tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def turn(instruction: str, response: str | None, input: str = "") -> str:
    """A later turn as documented in tokenization/alpaca.py, built from ALPACA_TEMPLATE."""
    text = ALPACA_TEMPLATE["instruction"].format(instruction=instruction)
    if input:
        text += ALPACA_TEMPLATE["input"].format(input=input)
    text += ALPACA_TEMPLATE["response"]
    return text if response is None else text + response + EOS_TOKEN


def render(tokenizer, messages, **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


@pytest.mark.parametrize("record", RECORDS)
def test_template_ids_and_assistant_mask_are_the_fine_tuning_ids_and_loss_mask(tiny_tokenizer, record):
    """Byte for byte: what `apply_chat_template` gives TRL is what our fine-tuning trains on."""
    ours = render_example(tiny_tokenizer, record)
    out = tiny_tokenizer.apply_chat_template(
        alpaca_messages(record), tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    assert out["input_ids"] == ours.input_ids
    assert out["assistant_masks"] == [int(label != IGNORE_INDEX) for label in ours.labels]
    assert ours.input_ids[-1] == tiny_tokenizer.eos_token_id and out["assistant_masks"][-1] == 1


def test_multi_turn_conversation_with_a_system_message(tiny_tokenizer):
    messages = [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Translate it."},
        {"role": "input", "content": "to French"},
        {"role": "assistant", "content": "Bleu."},
        {"role": "user", "content": "And a fruit?"},
    ]
    expected = (
        "You answer in one word."  # the system message replaces the Alpaca preamble
        + turn("Name a colour.", "Blue.")
        + turn("Translate it.", "Bleu.", input="to French")
        + turn("And a fruit?", None)
    )
    assert render(tiny_tokenizer, messages, add_generation_prompt=True) == expected
    # Without a system message the first turn is the plain Alpaca prompt.
    without = render(tiny_tokenizer, messages[1:3])
    assert without == format_prompt("Name a colour.") + "Blue." + EOS_TOKEN
    assert without.count(EOS_TOKEN) == 1


def test_assistant_mask_covers_every_answer_and_its_eos_and_nothing_else(tiny_tokenizer):
    messages = [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one."},
        {"role": "assistant", "content": "Green."},
    ]
    out = tiny_tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = out["input_ids"], out["assistant_masks"]
    spans, current = [], []
    for token, marked in zip(ids, mask, strict=True):
        if marked:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    spans.append(current)
    assert [tiny_tokenizer.decode(span) for span in spans] == ["Blue." + EOS_TOKEN, "Green." + EOS_TOKEN]


def test_generation_prompt_is_the_prompt_fine_tuning_trained_on(tiny_tokenizer):
    for record in RECORDS:
        prompt, _ = format_example(record)
        messages = alpaca_messages(record, with_response=False)
        assert render(tiny_tokenizer, messages, add_generation_prompt=True) == prompt
        # Without the flag the response header is left out (a conversation to continue later).
        assert render(tiny_tokenizer, messages) == prompt.removesuffix(ALPACA_TEMPLATE["response"])


@pytest.mark.parametrize(
    "messages, message",
    [
        ([{"role": "tool", "content": "x"}], "got role tool"),
        ([{"role": "system", "content": "s"}], "needs a user message"),
        ([{"role": "assistant", "content": "a"}], "an assistant message must answer a user message"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "two user messages in a row"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}], "a system message must come first"),
        ([{"role": "input", "content": "i"}], "an input message must follow a user message"),
    ],
)
def test_malformed_conversations_are_refused_with_the_reason(tiny_tokenizer, messages, message):
    with pytest.raises(Exception, match=f"The Alpaca chat template: .*{message}"):
        render(tiny_tokenizer, messages)
