"""The one place the instruction prompt format lives.

Fine-tuning, evaluation and the tokenizer's chat template all render records through
`format_prompt` / `format_example` and the pieces of ALPACA_TEMPLATE, so what the model is
trained on and what `apply_chat_template` produces are the same bytes.
"""

from __future__ import annotations

import json
import string
from collections.abc import Mapping

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
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
    """(prompt, response) for an Alpaca record; `input` may be missing or empty. Fine-tuning
    closes the response with the eos token (as an id), as the chat template does (as text)."""
    return format_prompt(record["instruction"], record.get("input") or ""), record["output"]


# --- The same template for `apply_chat_template` ---------------------------------------------
#
# Messages form:
#     [{"role": "system", "content": preamble},        # optional, first; replaces ALPACA_PREAMBLE
#      {"role": "user", "content": instruction},
#      {"role": "input", "content": input},            # optional, right after its user message
#      {"role": "assistant", "content": response},     # optional on the last turn
#      {"role": "user", ...}, ...]                     # more turns
#
# Rendered (eos is the tokenizer's eos token, e.g. <|endoftext|>):
#     preamble
#     \n\n### Instruction:\n{instruction}  [\n\n### Input:\n{input}]  \n\n### Response:\n{response}{eos}
#     \n\n### Instruction:\n{instruction}  [\n\n### Input:\n{input}]  \n\n### Response:\n{response}{eos}
#     ...
# The first turn is exactly the Alpaca prompt fine-tuning trains on, `format_prompt(...) +
# response + eos`; each later turn continues with the same sections, without the preamble.
# `add_generation_prompt=True` after a user (or input) message appends the response header.
# Each response and its eos sit inside `{% generation %}`, so `return_assistant_tokens_mask`
# (and TRL's `assistant_only_loss`) marks the same tokens as fine-tuning's loss mask.
# The Jinja source is generated from ALPACA_TEMPLATE so the wording lives in one place.


def _jinja_literal(text: str) -> str:
    # JSON string syntax is also valid Jinja string syntax, and keeps "\n" visible in the file.
    return "{{- " + json.dumps(text) + " -}}"


def _jinja_render(fmt: str, value: str) -> str:
    """('\\n\\n### Input:\\n{input}', 'message.content') -> Jinja printing the literal text and the value."""
    parts = []
    for literal, name, _, _ in string.Formatter().parse(fmt):
        if literal:
            parts.append(_jinja_literal(literal))
        if name:
            parts.append("{{- " + value + " -}}")
    return "".join(parts)


def _jinja_raise(message: str, then: str = "") -> str:
    """Jinja raising 'The Alpaca chat template: <message>', followed by the Jinja expression `then`."""
    return "{{- raise_exception(" + json.dumps("The Alpaca chat template: " + message) + then + ") -}}"


# ns.open: a user turn is waiting for its response; ns.previous: the role before this message.
ALPACA_CHAT_TEMPLATE = (
    "{%- set ns = namespace(open=false, previous=none, turns=0) -%}\n"
    "{%- for message in messages -%}\n"
    "{%- if message['role'] == 'system' -%}\n"
    "{%- if not loop.first -%}" + _jinja_raise("a system message must come first") + "{%- endif -%}\n"
    "{%- elif message['role'] == 'user' -%}\n"
    "{%- if ns.open -%}"
    + _jinja_raise("two user messages in a row; put an assistant message between them")
    + "{%- endif -%}\n"
    "{%- if ns.turns == 0 -%}"
    "{%- if messages[0]['role'] == 'system' -%}{{- messages[0]['content'] -}}"
    "{%- else -%}"
    + _jinja_literal(ALPACA_TEMPLATE["preamble"])
    + "{%- endif -%}{%- endif -%}\n"
    + _jinja_render(ALPACA_TEMPLATE["instruction"], "message['content']")
    + "\n"
    "{%- set ns.open = true -%}{%- set ns.turns = ns.turns + 1 -%}\n"
    "{%- elif message['role'] == 'input' -%}\n"
    "{%- if ns.previous != 'user' -%}" + _jinja_raise("an input message must follow a user message") + "{%- endif -%}\n"
    "{%- if message['content'] -%}" + _jinja_render(ALPACA_TEMPLATE["input"], "message['content']") + "{%- endif -%}\n"
    "{%- elif message['role'] == 'assistant' -%}\n"
    "{%- if not ns.open -%}"
    + _jinja_raise("an assistant message must answer a user message")
    + "{%- endif -%}\n"
    + _jinja_literal(ALPACA_TEMPLATE["response"])
    + "\n"
    "{%- generation -%}{{- message['content'] -}}{{- eos_token -}}{%- endgeneration -%}\n"
    "{%- set ns.open = false -%}\n"
    "{%- else -%}"
    + _jinja_raise(
        "roles are system (first, optional), user, input (optional, after user) and assistant; got role ",
        then=" + message['role']",
    )
    + "\n"
    "{%- endif -%}\n"
    "{%- set ns.previous = message['role'] -%}\n"
    "{%- endfor -%}\n"
    "{%- if ns.turns == 0 -%}" + _jinja_raise("it needs a user message (the instruction)") + "{%- endif -%}\n"
    "{%- if ns.open and add_generation_prompt -%}" + _jinja_literal(ALPACA_TEMPLATE["response"]) + "{%- endif -%}\n"
)


def alpaca_messages(record: Mapping[str, str], with_response: bool = True) -> list[dict[str, str]]:
    """An Alpaca record in the messages form ALPACA_CHAT_TEMPLATE reads."""
    messages = [{"role": "user", "content": record["instruction"]}]
    if record.get("input"):
        messages.append({"role": "input", "content": record["input"]})
    if with_response:
        messages.append({"role": "assistant", "content": record["output"]})
    return messages
