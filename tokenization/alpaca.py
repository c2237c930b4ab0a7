"""The one place the instruction prompt format lives.

Fine-tuning, evaluation and the tokenizer's chat template all render records through
`format_prompt` / `format_example`, so what the model is trained on and what
`apply_chat_template` produces are the same bytes.
"""

from __future__ import annotations

import json
import string
from typing import Mapping

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
ALPACA_TEMPLATE = {
    "preamble": ALPACA_PREAMBLE,
    "instruction": "\n\n### Instruction:\n{instruction}",
    # Only rendered when the record's input is non-empty.
    "input": "\n\n### Input:\n{input}",
    "response": "\n\n### Response:\n",
}


def format_prompt(instruction: str, input: str | None = None) -> str:
    """Everything before the response: preamble, instruction, optional input, response header."""
    text = ALPACA_TEMPLATE["preamble"] + ALPACA_TEMPLATE["instruction"].format(instruction=instruction)
    if input:
        text += ALPACA_TEMPLATE["input"].format(input=input)
    return text + ALPACA_TEMPLATE["response"]


def format_example(record: Mapping[str, str]) -> tuple[str, str]:
    """(prompt, response) for an Alpaca record; `input` may be missing or empty."""
    return format_prompt(record["instruction"], record.get("input") or ""), record["output"]


# --- The same template for `apply_chat_template` ---------------------------------------------
#
# Messages form (one record per conversation):
#     [{"role": "user", "content": instruction},
#      {"role": "input", "content": input},          # optional; skipped when empty
#      {"role": "assistant", "content": response}]   # optional
# With `add_generation_prompt=True` and no assistant message it renders `format_prompt(...)`;
# with an assistant message it renders `format_prompt(...) + response`, exactly the text
# fine-tuning trains on (the eos token is appended by the fine-tuning code, as ids).
# The Jinja source is generated from ALPACA_TEMPLATE so the wording lives in one place.


def _jinja_literal(text: str) -> str:
    # JSON string syntax is also valid Jinja string syntax, and keeps "\n" visible in the file.
    return "{{- " + json.dumps(text) + " -}}"


def _jinja_render(fmt: str) -> str:
    """'\\n\\n### Input:\\n{input}' -> Jinja that prints the literal text and `ns.input`."""
    parts = []
    for literal, name, _, _ in string.Formatter().parse(fmt):
        if literal:
            parts.append(_jinja_literal(literal))
        if name:
            parts.append("{{- ns." + name + " -}}")
    return "".join(parts)


ALPACA_CHAT_TEMPLATE = (
    "{%- set ns = namespace(instruction=none, input='', response=none) -%}\n"
    "{%- for message in messages -%}\n"
    "{%- if message['role'] == 'user' and ns.instruction is none -%}{%- set ns.instruction = message['content'] -%}\n"
    "{%- elif message['role'] == 'input' -%}{%- set ns.input = message['content'] or '' -%}\n"
    "{%- elif message['role'] == 'assistant' -%}{%- set ns.response = message['content'] -%}\n"
    "{%- else -%}{{- raise_exception('The Alpaca template takes one user message (the instruction), "
    "an optional input message and an optional assistant message; got role ' + message['role']) -}}\n"
    "{%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if ns.instruction is none -%}{{- raise_exception('The Alpaca template needs a user message') -}}{%- endif -%}\n"
    + _jinja_literal(ALPACA_TEMPLATE["preamble"]) + "\n"
    + _jinja_render(ALPACA_TEMPLATE["instruction"]) + "\n"
    + "{%- if ns.input -%}" + _jinja_render(ALPACA_TEMPLATE["input"]) + "{%- endif -%}\n"
    + "{%- if ns.response is not none or add_generation_prompt -%}"
    + _jinja_literal(ALPACA_TEMPLATE["response"]) + "{%- endif -%}\n"
    + "{%- if ns.response is not none -%}{{- ns.response -}}{%- endif -%}\n"
)


def alpaca_messages(record: Mapping[str, str], with_response: bool = True) -> list[dict[str, str]]:
    """An Alpaca record in the messages form ALPACA_CHAT_TEMPLATE reads."""
    messages = [{"role": "user", "content": record["instruction"]}]
    if record.get("input"):
        messages.append({"role": "input", "content": record["input"]})
    if with_response:
        messages.append({"role": "assistant", "content": record["output"]})
    return messages
