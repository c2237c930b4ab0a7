"""Byte-level BPE tokenization for MiniGPT: training, GPT-2's tokenizer, and BPE made visible.

train_bpe(source, vocab_size, ...)          -> PreTrainedTokenizerFast (saved if output_dir)
load_gpt2_tokenizer(encoder_json, vocab_bpe) -> the same type, with GPT-2's merges
encode_batch_fast(tokenizer, texts)          -> list[list[int]], the data pipeline's path
format_prompt / format_example / ALPACA_TEMPLATE, also the tokenizer's chat template
merge_trace(tokenizer, text), merge_table(...), token_boundaries_html(...), *_figure(...)
train_reference_bpe(texts, vocab_size, ...)  -> the same merges, in plain Python
"""

from .alpaca import ALPACA_CHAT_TEMPLATE, ALPACA_TEMPLATE, alpaca_messages, format_example, format_prompt
from .corpus import EMBEDDED_CORPUS, embedded_documents
from .fast_encode import encode_batch_fast
from .gpt2 import gpt2_tiktoken_encoding, load_gpt2_tokenizer, tiktoken_encoding
from .pretokenize import EOS_TOKEN, PAD_TOKEN, SPECIAL_TOKENS
from .reference_bpe import train_reference_bpe
from .train import train_bpe
from .visualize import (
    format_merge_table,
    format_merge_trace,
    learned_merges,
    merge_table,
    merge_trace,
    merge_trace_figure,
    token_boundaries_figure,
    token_boundaries_html,
)

__all__ = [
    "ALPACA_CHAT_TEMPLATE",
    "ALPACA_TEMPLATE",
    "EMBEDDED_CORPUS",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "alpaca_messages",
    "embedded_documents",
    "encode_batch_fast",
    "format_example",
    "format_merge_table",
    "format_merge_trace",
    "format_prompt",
    "gpt2_tiktoken_encoding",
    "learned_merges",
    "load_gpt2_tokenizer",
    "merge_table",
    "merge_trace",
    "merge_trace_figure",
    "tiktoken_encoding",
    "token_boundaries_figure",
    "token_boundaries_html",
    "train_bpe",
    "train_reference_bpe",
]
